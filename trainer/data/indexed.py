"""A memory-mapped token file with document boundaries (a small cousin of Megatron's
IndexedDataset).

    <prefix>.bin      every document's tokens back to back (uint16 when the vocab fits, else int32)
    <prefix>.idx.npy  int64 document start offsets into .bin, length num_docs + 1
    <prefix>.json     {"version", "dtype", "num_docs", "num_tokens", "vocab_size"}

The JSON sidecar is written last and is the commit record: files are written under temporary
names and renamed, so a reader either finds a complete, consistent set or an error naming the
file that is missing or does not match the sidecar.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

FORMAT_VERSION = 1
# Tokens per write: bounds memory while streaming an arbitrarily large corpus.
_FLUSH_TOKENS = 1 << 20


def _paths(prefix: str | Path) -> tuple[Path, Path, Path]:
    p = str(prefix)
    return Path(p + ".bin"), Path(p + ".idx.npy"), Path(p + ".json")


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write under a private name, then rename: readers see the old file or all of the new one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the file for every vocab up to 65535 ids (GPT-2's 50257 included)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size} must be positive")
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def _checked(doc: Sequence[int], vocab_size: int, index: int) -> np.ndarray:
    arr = np.asarray(doc, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"document {index} is not a flat sequence of token ids")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(
            f"document {index} has token ids outside [0, {vocab_size}): min {arr.min()}, max {arr.max()}"
        )
    return arr


def _write_tokens(path: Path, docs: Iterable[Sequence[int]], vocab_size: int) -> list[int]:
    """Stream `docs` into `path` -> document start offsets (num_docs + 1 of them)."""
    dtype = token_dtype(vocab_size)
    offsets = [0]
    pending: list[np.ndarray] = []
    pending_tokens = 0
    with open(path, "wb") as fh:
        for i, doc in enumerate(docs):
            arr = _checked(doc, vocab_size, i)
            offsets.append(offsets[-1] + arr.size)
            pending.append(arr.astype(dtype))
            pending_tokens += arr.size
            if pending_tokens >= _FLUSH_TOKENS:
                fh.write(np.concatenate(pending).tobytes())
                pending, pending_tokens = [], 0
        if pending:
            fh.write(np.concatenate(pending).tobytes())
    return offsets


def write_indexed(prefix: str | Path, docs: Iterable[Sequence[int]], vocab_size: int) -> None:
    """Write `docs` (each a sequence of token ids) as <prefix>.{bin,idx.npy,json}, atomically."""
    bin_path, idx_path, meta_path = _paths(prefix)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    tag = f".tmp-{os.getpid()}"
    tmp_bin, tmp_idx = Path(str(bin_path) + tag), Path(str(idx_path) + tag)
    try:
        offsets = _write_tokens(tmp_bin, docs, vocab_size)
        with open(tmp_idx, "wb") as fh:  # np.save on a path would append .npy to the temp name
            np.save(fh, np.asarray(offsets, dtype=np.int64))
    except BaseException:
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
        raise
    meta = {"version": FORMAT_VERSION, "dtype": token_dtype(vocab_size).name,
            "num_docs": len(offsets) - 1, "num_tokens": int(offsets[-1]), "vocab_size": int(vocab_size)}
    # Drop the old commit record first so a crash between renames never pairs an old sidecar
    # with new data.
    meta_path.unlink(missing_ok=True)
    os.replace(tmp_bin, bin_path)
    os.replace(tmp_idx, idx_path)
    atomic_write(meta_path, (json.dumps(meta, indent=1) + "\n").encode())


def indexed_exists(prefix: str | Path) -> bool:
    """True when a complete write finished (the sidecar is written last)."""
    return all(p.is_file() for p in _paths(prefix))


class IndexedTokens:
    """Read-only view of a write_indexed file; tokens stay on disk (memory-mapped)."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = str(prefix)
        bin_path, idx_path, meta_path = _paths(prefix)
        meta = self._read_meta(meta_path)
        self.vocab_size: int = int(meta["vocab_size"])
        self.dtype = np.dtype(meta["dtype"])
        self.num_docs: int = int(meta["num_docs"])
        self.num_tokens: int = int(meta["num_tokens"])
        self._offsets = self._read_offsets(idx_path)
        if not bin_path.is_file():
            raise FileNotFoundError(f"token file missing: {bin_path}")
        size = bin_path.stat().st_size
        if size != self.num_tokens * self.dtype.itemsize:
            raise ValueError(
                f"{bin_path} is corrupt: {size} bytes, but {meta_path} says "
                f"{self.num_tokens} {self.dtype.name} tokens ({self.num_tokens * self.dtype.itemsize} bytes)"
            )
        # np.memmap refuses empty files; an empty corpus is still a valid (if useless) file.
        self._tokens: np.ndarray = (
            np.memmap(bin_path, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)
        )

    @staticmethod
    def _read_meta(meta_path: Path) -> dict:
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"index sidecar missing: {meta_path} (not written, or write_indexed was interrupted)"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_path} is corrupt: {err}") from err
        missing = {"version", "dtype", "num_docs", "num_tokens", "vocab_size"} - set(meta)
        if missing:
            raise ValueError(f"{meta_path} is corrupt: missing keys {sorted(missing)}")
        if meta["version"] != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format version {meta['version']}, expected {FORMAT_VERSION}")
        return meta

    def _read_offsets(self, idx_path: Path) -> np.ndarray:
        if not idx_path.is_file():
            raise FileNotFoundError(f"document index missing: {idx_path}")
        try:
            offsets = np.load(idx_path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise ValueError(f"{idx_path} is corrupt: {err}") from err
        offsets = np.asarray(offsets, dtype=np.int64)
        ok = (
            offsets.shape == (self.num_docs + 1,)
            and offsets[0] == 0
            and offsets[-1] == self.num_tokens
            and bool(np.all(np.diff(offsets) >= 0))
        )
        if not ok:
            raise ValueError(
                f"{idx_path} is corrupt: expected {self.num_docs + 1} non-decreasing offsets "
                f"from 0 to {self.num_tokens}, got shape {offsets.shape}"
            )
        return offsets

    @property
    def doc_lengths(self) -> np.ndarray:
        """int64 token count of every document."""
        return np.diff(self._offsets)

    @property
    def doc_offsets(self) -> np.ndarray:
        """int64 start offsets (length num_docs + 1): doc i is tokens[offsets[i]:offsets[i+1]]."""
        return self._offsets

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document `i` (a read-only view in the file's dtype)."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range [0, {self.num_docs}) in {self.prefix}")
        return self._tokens[self._offsets[i]: self._offsets[i + 1]]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the whole file, across document boundaries."""
        return self._tokens[start:stop]

    def __len__(self) -> int:
        return self.num_docs
