"""`python -m tests.dist.kill_worker CONFIG TRIALS SEED OUT`: SIGKILL the real trainer at
random moments while it saves, TRIALS times on the same run, cheaply.

This process imports the trainer once (torch and megatron take most of a trainer's start
on CPU), then for every trial forks a child that runs `trainer.__main__.main` on CONFIG in a
session of its own (its checkpoint-writer helpers included, as a launcher's process group),
waits until that start has committed a checkpoint of its own, lets it go on for a random
moment of the saves that follow and kills the whole session. After each kill it records what
`latest` names, whether that checkpoint verifies, and the step the start resumed from; the
test (test_checkpoint_kill.py) asserts on those records (OUT, one JSON line per trial).

The trainer's checkpoint writer collects results through a helper process (parallel.
checkpoint.start_writer_service), which a trainer starts with the spawn method and which
then imports torch, about 2 s a start. Here each trial gets a fresh helper forked from this
process instead (torch already imported; the trainer finds it started), killed right after the trial
(a killed trial may leave results in it). What writes the files is the trial's own (threads of
its process for a synchronous save, megatron's forked async caller for an async one), in its
session, so the kill reaches it at the same moment; the helper only passes results on."""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any


def _child(config: str, log: Path) -> None:
    """The trial's trainer: its own session, stdout/stderr into `log`; never returns."""
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        from trainer.__main__ import main

        code = main([config])
    except BaseException:  # noqa: BLE001 - said in the trial's log, then the exit below
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait_for_a_commit(latest: Path, pid: int, log: Path, before: str | None, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if latest.exists() and latest.read_text() != before:
            return
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise SystemExit(f"trainer exited early (status {status}):\n{log.read_text()[-3000:]}")
        time.sleep(0.01)
    raise SystemExit(f"no checkpoint committed in time:\n{log.read_text()[-3000:]}")


def _fresh_writer_service() -> Any:
    """A helper of its own for the next trial, forked from this process."""
    from parallel.checkpoint import start_writer_service
    from trainer.signals import ignore_stop_signals

    return start_writer_service(ignore_stop_signals, method="fork", replace=True)


def main(argv: list[str]) -> int:
    config, trials, seed, out = argv[0], int(argv[1]), int(argv[2]), Path(argv[3])
    from omegaconf import OmegaConf

    # What the children need, imported once here (no torch op runs before a fork).
    import trainer.__main__  # noqa: F401
    import trainer.loop  # noqa: F401
    import trainer.stages  # noqa: F401
    from trainer.checkpoint_files import verify

    cfg = OmegaConf.load(config)
    run_dir = Path(cfg.run.dir)
    latest = run_dir / "checkpoints" / "latest"
    rng = random.Random(seed)
    with open(out, "w") as records:
        for trial in range(trials):
            # Sync and async saves alternate (the async writer is a helper process).
            cfg.ckpt.async_save = trial % 2 == 1
            trial_config = run_dir / "config_trial.yaml"
            OmegaConf.save(cfg, trial_config)
            log = run_dir / f"trial_{trial}.log"
            before = latest.read_text() if latest.exists() else None
            sys.stdout.flush()
            helper = _fresh_writer_service()
            pid = os.fork()
            if pid == 0:
                _child(str(trial_config), log)
            try:
                _wait_for_a_commit(latest, pid, log, before)
                time.sleep(rng.uniform(0.0, 0.5))
            finally:  # also when the trial failed: nothing of it outlives this process
                with contextlib.suppress(ProcessLookupError, ChildProcessError):  # already gone
                    os.killpg(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                helper._process.kill()
                helper._process.join()
            text = log.read_text()
            match = re.search(r"continuing at step (\d+)", text)
            name = latest.read_text().strip() if latest.exists() else None
            problems = verify(run_dir / "checkpoints" / name) if name else ["no latest"]
            records.write(json.dumps({"trial": trial, "async": bool(cfg.ckpt.async_save),
                                      "resumed_from": int(match.group(1)) if match else 0,
                                      "latest": name, "problems": problems}) + "\n")
            records.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
