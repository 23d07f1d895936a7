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
    crc = 0
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


# -- integrity --------------------------------------------------------------------------
def files_of_rank(directory: Path, rank: int, world: int) -> list[Path]:
    """The files this rank checksums: torch_dist writes `__<rank>_<n>.distcp`; the rest
    (metadata, common state, train state) are rank 0's. RNG files belong to their rank."""
    mine = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory)
        owner = 0
        match = re.match(r"^__(\d+)_\d+\.distcp$", path.name) or re.match(r"^rank_(\d+)\.pt$", path.name)
        if match:
            owner = int(match.group(1)) % world
        if owner == rank and rel.name != MANIFEST:
            mine.append(path)
    return mine


def describe(directory: Path, files: list[Path]) -> dict[str, dict[str, int]]:
    out = {}
    for path in files:
        _fsync_file(path)
        out[str(path.relative_to(directory))] = {"size": path.stat().st_size, "crc32": file_crc(path)}
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
        elif file_crc(path) != expected["crc32"]:
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
