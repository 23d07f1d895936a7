"""A local sweep whose points die hard, with the real trainer: of 4 points (2 fine, one that
raises, one SIGKILLed as by the out-of-memory killer; train.fault.crash) the fine ones
complete, the summary names each failure (the traceback; "killed by signal 9: likely out of
memory" with the rank's memory high-water mark), the sweep exits non-zero, and rerunning the
same command runs only the failed points (the drill fires once per run dir, as a transient
fault would) and reports the others as already done. 4 points, not 8: each costs a trainer
start on this CPU."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.dist

CHATFORGE = Path(sys.executable).parent / "chatforge"
COMMAND = [str(CHATFORGE), "-m", "train.fault.crash=none,raise@2,kill@2,none", "run.dir=sweep",
           "model.num_layers=1", "model.hidden_size=32", "model.seq_length=32", "logger=none",
           "train.steps=3", "train.global_batch=4", "train.micro_batch=2", "train.eval_every=0",
           "optim.warmup_steps=0", "data.embedded.num_docs=200", "tokenizer.vocab_size=384"]


def _sweep(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(COMMAND, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_sweep_with_a_raising_and_a_killed_point_then_rerun(tmp_path: Path) -> None:
    first = _sweep(tmp_path)
    assert first.returncode == 1, first.stderr[-3000:]
    sweep = tmp_path / "sweep"
    records = json.loads((sweep / "summary.json").read_text())
    assert [r["ok"] for r in records] == [True, False, False, True]
    assert [r["exit_code"] for r in records] == [0, 1, 137, 0]
    summary = (sweep / "summary.md").read_text()
    assert "### point 1 failed (train.fault.crash=raise@2)" in summary
    assert "RuntimeError: fault injection: train.fault.crash=raise@2 on rank 0" in summary
    assert "Traceback (most recent call last)" in summary
    assert "### point 2 failed (train.fault.crash=kill@2)" in summary
    killed = re.search(r"rank 0 on \S+ \(pid \d+\), last step 2, memory high-water mark (\d+) MiB "
                       r"killed by signal 9 \(SIGKILL\): likely out of memory; exit code 137", summary)
    assert killed and int(killed.group(1)) > 50, summary
    assert "2 of 4 sweep points failed: 1, 2" in first.stderr
    for num in (0, 3):
        assert (sweep / str(num) / "done.json").exists()
    print(f"sweep: 2/4 ok; point 1 raised, point 2 killed by signal 9 "
          f"(memory high-water mark {killed.group(1)} MiB)")

    rerun = _sweep(tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    said = rerun.stdout
    assert "sweep point 0: already done (done.json), skipped" in said
    assert "sweep point 3: already done (done.json), skipped" in said
    assert "2 of 4 sweep points were already done: 0, 3" in said
    records = json.loads((sweep / "summary.json").read_text())
    assert [r["ok"] for r in records] == [True] * 4
    assert [r["state"] for r in records] == ["already done", "", "", "already done"]
    summary = (sweep / "summary.md").read_text()
    assert summary.count("| ok (already done) |") == 2 and summary.count("| ok |") == 2
    for num in (1, 2):  # resumed from their checkpoints? They had none: started again, finished
        assert json.loads((sweep / str(num) / "done.json").read_text())["steps"] == 3
        log = (sweep / str(num) / "logs" / "rank_0.log").read_text()
        assert log.count("chatforge: rank 0 of 1 started") == 2  # ran twice
    for num in (0, 3):
        log = (sweep / str(num) / "logs" / "rank_0.log").read_text()
        assert log.count("chatforge: rank 0 of 1 started") == 1  # not rerun
