"""Turn the config's data settings into a tokenizer and an indexed token file, once per run.

Rank 0 calls prepare_pretrain_data before training; the other ranks call load_prepared after
the trainer's barrier. Layout under the run directory:

    data/corpus.txt            the generated corpus (data.format=embedded only)
    tokenizer/tokenizer.model  trained here unless tokenizer.path names one
    data/train.{bin,idx.npy,json}   all documents, tokenized (trainer/data/indexed.py)
    data/split.npz             document indices of the train and eval subsets
    data/prepared.json         the done-marker, written last, with what it was prepared from

A rerun on the same run directory (a resume) finds the marker and reuses everything; if the
data settings changed since, it stops with an error naming them rather than silently
training a checkpoint on other data or another vocabulary.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.corpus import generate_corpus
from trainer.data.gpt_dataset import split_documents
from trainer.data.indexed import IndexedTokens, atomic_write, indexed_exists
from trainer.data.preprocess import preprocess_text
from trainer.data.tokenizer_training import check_files, train_tokenizer
from trainer.data.readers import read_texts
from trainer.data.sources import columns_of, has_text_files

MARKER = "prepared.json"
FORMATS: tuple[str, ...] = ("embedded", "text")
# Only matters when the corpus has more lines than tokenizer.max_sentences.
_TOKENIZER_SEED = 0


@dataclass
class PreparedData:
    tokenizer_path: Path
    prefix: Path  # IndexedTokens prefix holding every document
    train_docs: np.ndarray  # int64 document indices
    eval_docs: np.ndarray
    vocab_size: int


def _text_files(cfg: Any) -> list[Path]:
    files = [p.strip() for p in str(cfg.data.path).split(",") if p.strip()]
    if not files:
        raise ValueError("data.path is empty: data.format=text needs a text file (or comma-separated files)")
    return check_files(files, key="data.path")


def _is_data_set(cfg: Any) -> bool:
    """format=text reads a data set's `text` column (trainer/data/sources.py), not text files."""
    return bool(str(cfg.data.path).strip()) and not has_text_files(str(cfg.data.path))


def _fingerprint(cfg: Any) -> dict[str, Any]:
    """The settings that decide the prepared files; a resume must not change them."""
    fp: dict[str, Any] = {
        "data.format": str(cfg.data.format),
        "data.eval_fraction": float(cfg.data.eval_fraction),
        "data.split_seed": int(cfg.data.split_seed),
        "tokenizer.path": str(cfg.tokenizer.path),
    }
    if fp["data.format"] == "embedded":
        fp["data.embedded.num_docs"] = int(cfg.data.embedded.num_docs)
        fp["data.embedded.seed"] = int(cfg.data.embedded.seed)
    else:
        fp["data.path"] = str(cfg.data.path)
        if _is_data_set(cfg):  # which column is the text
            fp["data.columns.text"] = columns_of(cfg).get("text", "text")
    if not fp["tokenizer.path"]:
        fp.update({
            "tokenizer.model_type": str(cfg.tokenizer.model_type),
            "tokenizer.vocab_size": int(cfg.tokenizer.vocab_size),
            "tokenizer.character_coverage": float(cfg.tokenizer.character_coverage),
            "tokenizer.max_sentences": int(cfg.tokenizer.max_sentences),
        })
    return fp


def _paths(cfg: Any, run_dir: Path) -> tuple[Path, Path, Path]:
    """(tokenizer model, token prefix, marker) for this config and run directory."""
    data_dir = run_dir / "data"
    tok = Path(str(cfg.tokenizer.path)) if cfg.tokenizer.path else run_dir / "tokenizer" / "tokenizer.model"
    return tok, data_dir / "train", data_dir / MARKER


def _check_marker(cfg: Any, marker: Path) -> None:
    recorded = json.loads(marker.read_text())["fingerprint"]
    now = _fingerprint(cfg)
    changed = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {recorded.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ValueError(
            f"{marker.parent} was prepared with other data settings ({diffs}); "
            "use a new run.dir, or the settings it was prepared with"
        )


def _source_files(cfg: Any, data_dir: Path) -> list[Path]:
    fmt = str(cfg.data.format)
    if fmt == "text" and not _is_data_set(cfg):
        return _text_files(cfg)
    if fmt == "text":
        corpus = data_dir / "text_corpus.txt"
        docs = read_texts(str(cfg.data.path), columns_of(cfg))
        # One document a row: blank lines inside one would split it (tools/preprocess.py).
        atomic_write(corpus, ("\n\n".join(re.sub(r"\n\s*\n", "\n", d.strip()) for d in docs) + "\n").encode("utf-8"))
        return [corpus]
    corpus = data_dir / "corpus.txt"
    docs = generate_corpus(int(cfg.data.embedded.num_docs), int(cfg.data.embedded.seed))
    # Blank lines separate documents, which is how preprocess_text splits them back.
    atomic_write(corpus, ("\n\n".join(docs) + "\n").encode("utf-8"))
    return [corpus]


def _train_tokenizer(cfg: Any, tok_path: Path, files: list[Path]) -> None:
    train_tokenizer(
        tok_path.with_suffix(""), int(cfg.tokenizer.vocab_size), files=files,
        model_type=str(cfg.tokenizer.model_type),
        character_coverage=float(cfg.tokenizer.character_coverage),
        max_sentences=int(cfg.tokenizer.max_sentences), seed=_TOKENIZER_SEED,
    )


def prepare_tokenizer(cfg: Any, run_dir: str | Path) -> Path:
    """Only the tokenizer that prepare_pretrain_data would train for this config, into
    <run_dir>/tokenizer/ (stage=tokenizer: a recipe's first step); reused if present."""
    tok_path, prefix, _ = _paths(cfg, Path(run_dir))
    if tok_path.is_file():
        return tok_path
    if str(cfg.data.format) not in FORMATS:
        raise ValueError(f"data.format={cfg.data.format!r}: the tokenizer is trained on one of {FORMATS}")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(cfg, tok_path, _source_files(cfg, prefix.parent))
    return tok_path


def prepare_pretrain_data(cfg: Any, run_dir: str | Path) -> PreparedData:
    """Generate or read the text, train the tokenizer, tokenize, split; reuse a finished run."""
    run_dir = Path(run_dir)
    tok_path, prefix, marker = _paths(cfg, run_dir)
    if marker.is_file():
        return load_prepared(cfg, run_dir)
    if str(cfg.data.format) not in FORMATS:
        raise ValueError(f"data.format={cfg.data.format!r}: pretraining reads one of {FORMATS}")
    if cfg.tokenizer.path and not tok_path.is_file():
        raise FileNotFoundError(f"tokenizer.path: file not found: {tok_path}")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    files = _source_files(cfg, prefix.parent)
    if not cfg.tokenizer.path:
        _train_tokenizer(cfg, tok_path, files)
    stats = preprocess_text(files, tok_path, prefix)
    train, evals = split_documents(stats.num_docs, float(cfg.data.eval_fraction), int(cfg.data.split_seed))
    buf = io.BytesIO()
    np.savez(buf, train=train, eval=evals)
    atomic_write(prefix.parent / "split.npz", buf.getvalue())
    record = {"fingerprint": _fingerprint(cfg), "num_docs": stats.num_docs,
              "num_tokens": stats.num_tokens, "vocab_size": stats.vocab_size,
              "train_docs": int(train.size), "eval_docs": int(evals.size)}
    atomic_write(marker, (json.dumps(record, indent=1) + "\n").encode("utf-8"))
    return PreparedData(tok_path, prefix, train, evals, stats.vocab_size)


def load_prepared(cfg: Any, run_dir: str | Path) -> PreparedData:
    """What prepare_pretrain_data made for `run_dir` (cheap: reads the marker and the split)."""
    tok_path, prefix, marker = _paths(cfg, Path(run_dir))
    if not marker.is_file():
        raise FileNotFoundError(
            f"{marker} not found: the data were not prepared (rank 0 runs prepare_pretrain_data first)"
        )
    _check_marker(cfg, marker)
    if not indexed_exists(prefix):
        raise FileNotFoundError(f"{marker} exists but the token files {prefix}.* are missing")
    with np.load(prefix.parent / "split.npz") as split:
        train, evals = split["train"].astype(np.int64), split["eval"].astype(np.int64)
    vocab_size = IndexedTokens(prefix).vocab_size
    if not tok_path.is_file():
        raise FileNotFoundError(f"tokenizer model missing: {tok_path}")
    return PreparedData(tok_path, prefix, train, evals, vocab_size)
