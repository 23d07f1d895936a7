"""Checksums of checkpoint files, computed while the shards are written, not read back.

The digest is XXH3-64 (the `xxhash` package): about 10 GB/s on one core here against
zlib's CRC32 at about 2 GB/s, so hashing stays a small part of writing (checkpoints with a
CRC32 manifest, from before, still verify: trainer/checkpoint_files.verify).

The checkpoint writer (parallel.checkpoint) streams every shard file through `HashingWriter`,
which hashes exactly the bytes handed to the file, and after the file is fsynced records its
size and digest in a small sidecar `<shard>.xxh3`. The commit (trainer/checkpoint_files.
describe) takes a shard's entry from its sidecar when the sizes agree, instead of reading the
whole shard again (at 200 MB that re-read was about a sixth of a save). Loading still checks
every file against the manifest by reading it.

Torch-free (the trainer's checkpoint-file helpers import it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import xxhash

DIGEST = "xxh3_64"  # the manifest's key for a file's digest
SIDECAR_SUFFIX = ".xxh3"


def new_hasher() -> Any:
    return xxhash.xxh3_64()


def file_digest(path: Path, chunk: int = 1 << 22) -> int:
    hasher = new_hasher()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            hasher.update(block)
    return int(hasher.intdigest())


class HashingWriter:
    """A binary file's write side that hashes what passes through it (write, tell, flush)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.hasher = new_hasher()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        self.size += len(view)
        return self.raw.write(view)

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        self.raw.flush()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.raw.fileno()

    @property
    def entry(self) -> dict[str, int]:
        """What the manifest records for the bytes written so far."""
        return {"size": self.size, DIGEST: int(self.hasher.intdigest())}


def write_sidecar(path: Path, entry: dict[str, int]) -> None:
    """Record a finished (fsynced) shard's manifest entry next to it, durably."""
    with open(sidecar_of(path), "w") as handle:
        handle.write(json.dumps(entry))
        handle.flush()
        os.fsync(handle.fileno())


def sidecar_of(path: Path) -> Path:
    return Path(str(path) + SIDECAR_SUFFIX)


def read_sidecar(path: Path) -> Optional[dict[str, int]]:
    """The recorded manifest entry of shard `path` when its sidecar exists and the size
    matches the file on disk; None otherwise (the caller then reads the file)."""
    try:
        found = json.loads(sidecar_of(path).read_text())
        entry = {"size": int(found["size"]), DIGEST: int(found[DIGEST])}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return entry if path.stat().st_size == entry["size"] else None
