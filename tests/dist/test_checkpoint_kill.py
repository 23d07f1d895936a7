"""SIGKILL the trainer at random moments while it saves (sync and async saves alternate),
50 times on the same run: after every kill `latest` must verify and the next start must
load it; the run finally completes with exactly the losses of an uninterrupted run.

The trials run in tests/dist/kill_worker.py, which imports the trainer once and forks each
trial's trainer from there (a trial then costs its saves, not an interpreter start).
CHATFORGE_KILL_TRIALS sets the number of kills (50)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, run_trainer, write_config

pytestmark = pytest.mark.dist

# Enough steps that 50 trials (a few saves each) never reach the end.
STEPS = 300
BASE: dict[str, Any] = {
    "logger": "none", "seed": 5,
    "model": {"num_layers": 2, "seq_length": 32, "hidden_size": 32},
    "train": {"steps": STEPS, "global_batch": 4, "micro_batch": 2, "eval_every": 0},
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "data": {"embedded": {"num_docs": 200}},
    "ckpt": {"every": 1, "keep": 2},
}


def test_kill_during_saves_never_breaks_latest(tmp_path: Path) -> None:
    trials = int(os.environ.get("CHATFORGE_KILL_TRIALS", "50"))
    run_dir = tmp_path / "killed"
    path = write_config(run_dir, copy.deepcopy(BASE))
    out = tmp_path / "trials.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    worker = subprocess.run([sys.executable, "-m", "tests.dist.kill_worker", str(path), str(trials), "1234",
                             str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert worker.returncode == 0, worker.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == trials
    assert {r["async"] for r in records} == ({False, True} if trials > 1 else {False})
    last_step = 0
    for r in records:
        assert r["problems"] == [], f"trial {r['trial']}: latest does not verify: {r['problems']}"
        assert r["resumed_from"] >= last_step, f"trial {r['trial']} resumed from an older checkpoint"
        last_step = int(r["latest"].split("_")[1])
    assert last_step > 0, "no checkpoint was ever committed"
    resumed_from = [r["resumed_from"] for r in records]
    assert all(s > 0 for s in resumed_from[1:]), resumed_from  # every restart loaded latest
    # Finish the killed run (no more periodic saves) and compare with an uninterrupted one
    # (the two runs side by side: one process each).
    final = copy.deepcopy(BASE)
    final["ckpt"] = {"every": 0}
    with ThreadPoolExecutor(2) as pool:
        finishing = pool.submit(run_trainer, run_dir, final)
        straight = pool.submit(run_trainer, tmp_path / "straight", final)
        finished, reference = finishing.result(), straight.result()
    assert [r["step"] for r in finished] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in finished] == [r["loss"] for r in reference]
    print(f"kill trials: {trials}, resumed from steps {resumed_from}")
