"""SIGKILL the trainer at random moments while it saves (sync and async saves alternate),
over and over on the same run: after every kill `latest` must verify and the next start
must load it; the run finally completes with exactly the losses of an uninterrupted run.

CHATFORGE_KILL_TRIALS sets the number of kills (8 in the suite; 50 was run once, see
docs/checkpoints.md)."""
from __future__ import annotations

import copy
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, read_metrics, run_trainer, write_config
from trainer.checkpoint_files import verify

pytestmark = pytest.mark.dist

STEPS = 150
BASE: dict[str, Any] = {
    "logger": "none", "seed": 5,
    "model": {"num_layers": 2, "seq_length": 32, "hidden_size": 32},
    "train": {"steps": STEPS, "global_batch": 4, "micro_batch": 2, "eval_every": 0},
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "data": {"embedded": {"num_docs": 200}},
    "ckpt": {"every": 1, "keep": 2},
}


def _start(run_dir: Path, cfg: dict[str, Any], log: Path) -> subprocess.Popen:
    path = write_config(run_dir, cfg)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    with open(log, "w") as out:
        # Its own session: the kill reaches the async-save writer processes too.
        return subprocess.Popen([sys.executable, "-m", "trainer", str(path)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_a_commit(latest: Path, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Until this start has committed a checkpoint of its own (so every trial progresses);
    the kill then lands at a random point of the saves that follow."""
    before = latest.read_text() if latest.exists() else None
    deadline = time.time() + timeout
    while time.time() < deadline:
        if latest.exists() and latest.read_text() != before:
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint committed in time:\n{log.read_text()[-3000:]}")


def test_kill_during_saves_never_breaks_latest(tmp_path: Path) -> None:
    trials = int(os.environ.get("CHATFORGE_KILL_TRIALS", "8"))
    rng = random.Random(1234)
    run_dir = tmp_path / "killed"
    last_step, resumed_from = 0, []
    for trial in range(trials):
        cfg = copy.deepcopy(BASE)
        cfg["ckpt"]["async_save"] = trial % 2 == 1
        log = tmp_path / f"trial_{trial}.log"
        proc = _start(run_dir, cfg, log)
        latest = run_dir / "checkpoints" / "latest"
        _wait_for_a_commit(latest, proc, log)
        time.sleep(rng.uniform(0.0, 1.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        text = log.read_text()
        match = re.search(r"continuing at step (\d+)", text)
        resumed_from.append(int(match.group(1)) if match else 0)
        assert resumed_from[-1] >= last_step, "a later start resumed from an older checkpoint"
        if latest.exists():
            directory = run_dir / "checkpoints" / latest.read_text().strip()
            assert verify(directory) == [], f"trial {trial}: latest does not verify"
            last_step = int(directory.name.split("_")[1])
    assert last_step > 0, "no checkpoint was ever committed"
    assert all(s > 0 for s in resumed_from[1:]), resumed_from  # every restart loaded latest
    # Finish the killed run (no more periodic saves) and compare with an uninterrupted one.
    final = copy.deepcopy(BASE)
    final["ckpt"] = {"every": 0}
    finished = run_trainer(run_dir, final)
    straight = run_trainer(tmp_path / "straight", final)
    assert [r["step"] for r in finished] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in finished] == [r["loss"] for r in straight]
    print(f"kill trials: {trials}, resumed from steps {resumed_from}")
