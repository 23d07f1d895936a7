"""Integrity checks of a committed checkpoint directory: each kind of damage is found and
the message names the file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.checkpoint_files import MANIFEST, describe, verify


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    directory = tmp_path / "step_000004"
    (directory / "shards").mkdir(parents=True)
    (directory / "shards" / "__0_0.distcp").write_bytes(bytes(range(256)) * 40)
    (directory / "shards" / "__1_0.distcp").write_bytes(b"x" * 5000)
    (directory / "train_state.pt").write_bytes(b"state")
    files = describe(directory, sorted(p for p in directory.rglob("*") if p.is_file()))
    (directory / MANIFEST).write_text(json.dumps({"step": 4, "files": files}))
    return directory


def test_intact_checkpoint_verifies(checkpoint: Path) -> None:
    assert verify(checkpoint) == []


def test_flipped_byte_is_named(checkpoint: Path) -> None:
    shard = checkpoint / "shards" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[1234] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = verify(checkpoint)
    assert len(problems) == 1 and str(shard) in problems[0] and "checksum" in problems[0]


def test_truncated_file_is_named(checkpoint: Path) -> None:
    shard = checkpoint / "shards" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    problems = verify(checkpoint)
    assert len(problems) == 1 and str(shard) in problems[0] and "truncated" in problems[0]


def test_missing_shard_is_named(checkpoint: Path) -> None:
    shard = checkpoint / "shards" / "__1_0.distcp"
    shard.unlink()
    assert verify(checkpoint) == [f"{shard}: missing"]


def test_uncommitted_directory_is_refused(checkpoint: Path) -> None:
    (checkpoint / MANIFEST).unlink()
    assert "never committed" in verify(checkpoint)[0]


def test_shard_hashed_while_written_is_not_read_again(tmp_path: Path) -> None:
    """The writer's HashingWriter digest is the file's; describe() takes a shard's entry from
    its sidecar when the sizes agree (a planted wrong digest shows the file was not read) and
    reads the file when they do not."""
    import torch

    from parallel.shard_hash import DIGEST, HashingWriter, file_digest, write_sidecar

    shard = tmp_path / "shards" / "__0_0.distcp"
    shard.parent.mkdir()
    with open(shard, "wb") as raw:
        stream = HashingWriter(raw)
        torch.save(torch.arange(1000.0), stream)
    assert stream.entry == {"size": shard.stat().st_size, DIGEST: file_digest(shard)}
    write_sidecar(shard, {"size": stream.size, DIGEST: 12345})
    assert describe(tmp_path, [shard])["shards/__0_0.distcp"] == {"size": stream.size, DIGEST: 12345}
    write_sidecar(shard, {"size": stream.size + 1, DIGEST: 12345})
    assert describe(tmp_path, [shard])["shards/__0_0.distcp"] == stream.entry


def test_crc32_manifest_from_before_still_verifies(checkpoint: Path) -> None:
    from trainer.checkpoint_files import file_crc

    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"] = {rel: {"size": entry["size"], "crc32": file_crc(checkpoint / rel)}
                         for rel, entry in manifest["files"].items()}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    assert verify(checkpoint) == []
    shard = checkpoint / "shards" / "__1_0.distcp"
    shard.write_bytes(b"y" * 5000)
    assert verify(checkpoint) == [f"{shard}: checksum mismatch (corrupt)"]


def test_ranks_split_the_work(checkpoint: Path) -> None:
    (checkpoint / "train_state.pt").write_bytes(b"STATE")  # same size, other bytes
    found = verify(checkpoint, 0, 2) + verify(checkpoint, 1, 2)
    assert len(found) == 1 and "train_state.pt" in found[0]


def test_retention_keeps_last_k_every_mth_and_the_newest() -> None:
    from trainer.checkpointing import retained

    steps = [10, 20, 30, 40, 50, 60]
    assert retained(steps, 60, keep_last=2, keep_every=0) == {50, 60}
    assert retained(steps, 60, keep_last=2, keep_every=20) == {20, 40, 50, 60}
    assert retained(steps, 60, keep_last=0, keep_every=0) == {60}  # never the newest
    # An older step written again (rerun) is kept even if it is not among the last K.
    assert 30 in retained(steps, 30, keep_last=1, keep_every=0)


class _RunsCode:
    """What a hostile pickle holds: unpickling it would run a shell command."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple:
        import os

        return (os.system, (f"touch {self.canary}",))


def test_state_files_load_weights_only(tmp_path: Path) -> None:
    """train_state.pt and the RNG files load with weights_only=True (numpy's RNG state
    allowlisted); a file that would run code is refused with a CheckpointError naming it."""
    import numpy as np
    import torch

    from trainer.checkpoint_files import CheckpointError
    from trainer.checkpointing import _torch_save, load_state_file, rng_state

    good = tmp_path / "rng_rank_00000.pt"
    state = rng_state()
    _torch_save(state, good)
    loaded = load_state_file(good)
    assert np.array_equal(loaded["numpy"][1], state["numpy"][1]) and torch.equal(loaded["torch"], state["torch"])
    bad, canary = tmp_path / "train_state.pt", tmp_path / "pwned"
    torch.save({"step": 3, "stage": _RunsCode(canary)}, bad)
    with pytest.raises(CheckpointError, match=rf"^{bad}: refused by torch's weights-only loader.*GLOBAL posix.system"):
        load_state_file(bad)
    assert not canary.exists()
