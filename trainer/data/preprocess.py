"""Tokenize plain text files into an indexed token file for pretraining.

The library half of `python -m tools.preprocess`; data.format=text runs prepare it through
trainer/data/prepare.py. A document is a paragraph: lines up to the next blank (or whitespace-only) line; its lines
keep their newlines between them and the document ends with the EOD token. Files never share
a document. Writes PREFIX.{bin,idx.npy,json} (trainer/data/indexed.py).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from trainer.data.indexed import write_indexed
from trainer.data.tokenizer import Tokenizer
from trainer.data.tokenizer_training import check_files

# Documents per sentencepiece call: batches let it use its thread pool.
_ENCODE_BATCH = 1024


@dataclass
class PreprocessStats:
    num_files: int
    num_docs: int
    num_tokens: int
    vocab_size: int


def iter_documents(files: Sequence[str | Path]) -> Iterator[str]:
    """Paragraphs of the files, in order; blank-line runs separate them, nothing is empty."""
    for f in files:
        lines: list[str] = []
        with open(f, encoding="utf-8") as fh:
            try:
                for line in fh:
                    if line.strip():
                        lines.append(line.rstrip("\r\n"))
                    elif lines:
                        yield "\n".join(lines)
                        lines = []
            except UnicodeDecodeError as err:
                raise ValueError(f"{f} is not UTF-8 text: {err}") from err
        if lines:
            yield "\n".join(lines)


def _encoded(tokenizer: Tokenizer, docs: Iterator[str], stats: PreprocessStats) -> Iterator[list[int]]:
    batch: list[str] = []

    def flush() -> Iterator[list[int]]:
        for ids in tokenizer.encode_batch(batch):
            ids.append(tokenizer.eod_id)
            stats.num_docs += 1
            stats.num_tokens += len(ids)
            yield ids
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) >= _ENCODE_BATCH:
            yield from flush()
    yield from flush()


def preprocess_text(
    files: Sequence[str | Path], tokenizer_path: str | Path, out_prefix: str | Path
) -> PreprocessStats:
    """Split `files` into documents, tokenize them (each ended by EOD) and write `out_prefix`."""
    paths = check_files(files)
    tokenizer = Tokenizer(tokenizer_path)
    stats = PreprocessStats(num_files=len(paths), num_docs=0, num_tokens=0, vocab_size=tokenizer.vocab_size)
    docs = iter_documents(paths)
    first = next(docs, None)
    if first is None:  # fail before writing: an empty token file would only fail later
        raise ValueError(f"no text found in {[str(p) for p in paths]}: every line is blank")
    write_indexed(out_prefix, _encoded(tokenizer, itertools.chain([first], docs), stats), tokenizer.vocab_size)
    return stats
