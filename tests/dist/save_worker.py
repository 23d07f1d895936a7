"""`python -m tests.dist.save_worker DIR`: one process, three synchronous saves of a tiny
engine through the trainer's Checkpointer, with checks that print OK or raise.

- A synchronous save forks no process: os.fork raises once the writer service is up
  (megatron's own shard writer forked one process per shard file on every save).
- Every shard has a digest sidecar, and every manifest entry is the file's digest.
- ckpt.keep=1: the older checkpoints leave step_* at once (retired to .trash_*, deleted
  in the background); after close() nothing of them is left.
- A .trash_* left by a start that was killed is removed by the next start."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(root: Path) -> None:
    from parallel.shard_hash import DIGEST, SIDECAR_SUFFIX, file_digest
    from tools.bench.checkpoint_io import _setup
    from trainer.checkpoint_files import MANIFEST, verify
    from trainer.checkpointing import TRASH_PREFIX, Checkpointer

    ctx, engine = _setup(argparse.Namespace(hidden=64, layers=1), root / "run")
    checkpoints = root / "run" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    stale = checkpoints / (TRASH_PREFIX + "step_000009")
    (stale / "shards").mkdir(parents=True)
    ckpt = Checkpointer(ctx)
    assert not stale.exists(), "a stale .trash_ directory survived the start"
    ckpt._warm.join()  # the writer service (a spawned helper) is up; from here nothing may fork

    def no_fork() -> int:
        raise AssertionError("a synchronous save forked a process")

    os.fork = no_fork
    for step in (1, 2, 3):
        ckpt.save(step, {"model": engine}, {})
        assert ckpt.complete_steps() == [step], ckpt.complete_steps()
    directory = checkpoints / "step_000003"
    shards = sorted((directory / "shards").glob("*.distcp"))
    assert shards and all(Path(str(s) + SIDECAR_SUFFIX).is_file() for s in shards), shards
    files = json.loads((directory / MANIFEST).read_text())["files"]
    for rel, entry in files.items():
        assert entry == {"size": (directory / rel).stat().st_size, DIGEST: file_digest(directory / rel)}, rel
    assert verify(directory) == []
    ckpt.close()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000003"]
    print("OK", len(shards), "shards", flush=True)
    from trainer import runtime

    runtime.close(ctx)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
