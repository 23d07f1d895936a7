"""Train a sentencepiece tokenizer with the chat format's special tokens.

The library half of tokenizer training: the trainer calls train_tokenizer when a run has no
tokenizer (trainer/data/prepare.py, chat_prepare.py); `python -m tools.tokenizer` is the
command on top of it. The special pieces and their ids are documented in
trainer/data/tokenizer.py and docs/data.md.

Choices that make the tokenizer fit an LM rather than sentencepiece's MT defaults:
identity normalization, no whitespace squashing and no dummy prefix, so that
decode(encode(text)) == text exactly and encode(a) + encode(b) == encode(a + b) at most
boundaries (the chat templates concatenate pieces); byte fallback, so any text encodes without
<unk>; split digits, so arithmetic sees one token per digit.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from trainer.data.indexed import atomic_write
from trainer.data.tokenizer import (CHAT_PIECES, EOD_PIECE, MIN_VOCAB_SIZE, NUM_BYTE_PIECES, NUM_SPECIAL,
                                    PAD_PIECE, UNK_PIECE)

MODEL_TYPES: tuple[str, ...] = ("bpe", "unigram")
# sentencepiece silently skips longer sentences; chunking keeps one-line files usable.
MAX_SENTENCE_CHARS = 4096
MAX_SENTENCE_BYTES = 4 * MAX_SENTENCE_CHARS


def _chunks(line: str) -> Iterator[str]:
    while len(line) > MAX_SENTENCE_CHARS:
        cut = line.rfind(" ", 0, MAX_SENTENCE_CHARS)
        cut = cut if cut > 0 else MAX_SENTENCE_CHARS
        yield line[:cut]
        line = line[cut:]
    if line:
        yield line


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    """One sentence per non-blank line: sentencepiece trains on lines, not on documents."""
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield from _chunks(line)


def _file_lines(files: Sequence[str | Path]) -> Iterator[str]:
    for f in files:
        with open(f, encoding="utf-8") as fh:
            try:
                yield from fh
            except UnicodeDecodeError as err:
                raise ValueError(f"{f} is not UTF-8 text: {err}") from err


def check_files(files: Sequence[str | Path], key: str = "--input") -> list[Path]:
    """Fail before any work when an input is missing, naming it (and the option it came from)."""
    if not files:
        raise ValueError(f"{key}: no input files given")
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{key}: input file not found: {p}")
    return paths


def _validate(vocab_size: int, model_type: str, character_coverage: float) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"tokenizer.vocab_size={vocab_size} is too small: {NUM_SPECIAL} special tokens and "
            f"{NUM_BYTE_PIECES} byte-fallback pieces need at least {MIN_VOCAB_SIZE}"
        )
    if model_type not in MODEL_TYPES:
        raise ValueError(f"tokenizer.model_type={model_type!r} must be one of {MODEL_TYPES}")
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"tokenizer.character_coverage={character_coverage} must be in (0, 1]")


class _CountingIterator:
    """Counts what sentencepiece consumed so an empty corpus gets our message, not its."""

    def __init__(self, it: Iterator[str]) -> None:
        self._it = it
        self.count = 0

    def __iter__(self) -> "_CountingIterator":
        return self

    def __next__(self) -> str:
        item = next(self._it)
        self.count += 1
        return item


def train_tokenizer(
    out_prefix: str | Path,
    vocab_size: int,
    *,
    texts: Iterable[str] | None = None,
    files: Sequence[str | Path] | None = None,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    max_sentences: int = 200_000,
    seed: int = 0,
    num_threads: int = 4,
) -> str:
    """Train on `texts` (strings, split into lines) or `files` (exactly one) -> the .model path.

    Deterministic given the inputs and `num_threads`: sentencepiece's result depends on the
    thread count, so it is a fixed argument rather than the machine's core count. At most
    `max_sentences` lines are used (0: all), sampled with `seed` when there are more.
    """
    _validate(vocab_size, model_type, character_coverage)
    if files is not None and texts is None:
        source: Iterable[str] = _file_lines(check_files(files))
    elif texts is not None and files is None:
        source = texts
    else:
        raise ValueError("train_tokenizer: pass exactly one of texts= or files=")
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    sentences = _CountingIterator(_sentences(source))
    # In memory rather than via model_prefix, which sentencepiece would record inside the
    # model and so make the bytes depend on where it was trained.
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            pad_id=0, pad_piece=PAD_PIECE,
            unk_id=1, unk_piece=UNK_PIECE,
            eos_id=2, eos_piece=EOD_PIECE,
            bos_id=-1,
            user_defined_symbols=list(CHAT_PIECES),
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as err:
        if sentences.count == 0:
            raise ValueError("tokenizer training input has no non-blank lines") from err
        if "Vocabulary size" in str(err):
            raise ValueError(f"tokenizer.vocab_size={vocab_size} does not fit this corpus: {err}") from err
        raise
    proto = model.getvalue()
    atomic_write(Path(f"{out}.vocab"), _vocab_listing(proto))
    atomic_write(Path(f"{out}.model"), proto)  # last: it is what readers look for
    return f"{out}.model"


def _vocab_listing(proto: bytes) -> bytes:
    """sentencepiece's .vocab file (piece TAB score per id), for people reading the vocab."""
    sp = spm.SentencePieceProcessor(model_proto=proto)
    rows = (f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    return "".join(rows).encode("utf-8")
