"""The files of a checkpoint on disk: step directory names, the manifest that commits them,
its verification, and durable (fsynced, atomic) writes.

Below both trainer/checkpointing.py (saving and resuming) and trainer/lora_checkpoint.py
(loading LoRA runs' adapters onto their bases): both verify a step directory before loading it.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path

from parallel.shard_hash import DIGEST, SIDECAR_SUFFIX, file_digest, read_sidecar

STEP_DIR = re.compile(r"^step_(\d{6,})$")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted; the message names the file."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_crc(path: Path, chunk: int = 1 << 22) -> int:
    """CRC32 of a file: what manifests recorded before the XXH3 digest (still verified)."""
    crc = 0
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


# -- integrity --------------------------------------------------------------------------
# torch_dist's shard files of a rank, and their digest sidecars (parallel/shard_hash.py).
_SHARD = re.compile(r"^__(\d+)_\d+\.distcp(" + re.escape(SIDECAR_SUFFIX) + ")?$")


def files_of_rank(directory: Path, rank: int, world: int) -> list[Path]:
    """The files this rank checksums: torch_dist writes `__<rank>_<n>.distcp`; the rest
    (metadata, common state, train state) are rank 0's. RNG files belong to their rank."""
    mine = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory)
        owner = 0
        match = _SHARD.match(path.name) or re.match(r"^rank_(\d+)\.pt$", path.name)
        if match:
            owner = int(match.group(1)) % world
        if owner == rank and rel.name != MANIFEST:
            mine.append(path)
    return mine


def describe(directory: Path, files: list[Path]) -> dict[str, dict[str, int]]:
    """Size and digest (XXH3-64) of each file, for the manifest. A shard that the writer
    hashed while writing it (and fsynced) has a sidecar with both (parallel/shard_hash.py):
    it is not read again. Any other file is fsynced and read."""
    out = {}
    for path in files:
        found = read_sidecar(path)
        if found is None:
            _fsync_file(path)
            found = {"size": path.stat().st_size, DIGEST: file_digest(path)}
        out[str(path.relative_to(directory))] = found
    return out


def verify(directory: Path, rank: int = 0, world: int = 1) -> list[str]:
    """Problems with a checkpoint directory, each naming its file. Each rank checks its
    share of the files (round robin); callers gather the lists."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return [f"{manifest_path}: missing (the checkpoint was never committed)"]
    try:
        manifest = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return [f"{manifest_path}: unreadable manifest ({exc})"]
    problems = []
    for index, (rel, expected) in enumerate(sorted(manifest.items())):
        if index % world != rank:
            continue
        path = directory / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {expected['size']} (truncated?)")
        elif (file_digest(path) != expected[DIGEST] if DIGEST in expected
              else file_crc(path) != expected["crc32"]):
            problems.append(f"{path}: checksum mismatch (corrupt)")
    return problems


def resolve_load_path(path: Path) -> Path:
    """`ckpt.load` may name a run dir, its checkpoints/ dir, or one step_NNNNNN dir."""
    path = path.expanduser().resolve()
    if not path.exists():
        raise CheckpointError(f"ckpt.load={path}: does not exist (refusing to start from random weights)")
    for root in (path / "checkpoints", path):
        pointer = root / "latest"
        if pointer.is_file():
            name = pointer.read_text().strip()
            if not STEP_DIR.match(name) or not (root / name).is_dir():
                raise CheckpointError(f"{pointer}: names {name!r}, which is not a checkpoint directory")
            return root / name
    if STEP_DIR.match(path.name):
        return path
    raise CheckpointError(f"ckpt.load={path}: no checkpoint found (no latest file, not a step_NNNNNN dir)")
