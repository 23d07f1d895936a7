"""The pieces of the SLURM path that need no cluster: tracebacks from rank logs, the last
metrics of a run, the task's exit-code contract."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from launcher.jobs import last_metrics
from launcher.failures import failure_line, failure_text, log_tail
from launcher.slurm_task import EXIT_REQUEUE, TrainerTask

CHAINED = """== chatforge: job 7 restart 0 rank 0 on n1
step 1/10 | loss 6.0
[rank0]: Traceback (most recent call last):
[rank0]:   File "a.py", line 1, in f
[rank0]: KeyError: 'x'
[rank0]:
[rank0]: The above exception was the direct cause of the following exception:
[rank0]:
[rank0]: Traceback (most recent call last):
[rank0]:   File "b.py", line 2, in g
[rank0]: ValueError: tokenizer.vocab_size=99999 does not fit
"""


def test_log_tail_returns_the_whole_chained_traceback(tmp_path: Path) -> None:
    log = tmp_path / "rank_0.log"
    log.write_text(CHAINED)
    tail = log_tail(log)
    assert tail.startswith("[rank0]: Traceback") and "KeyError" in tail
    assert tail.endswith("does not fit") and "step 1/10" not in tail


def test_failure_text_names_the_rank_with_a_traceback(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "rank_0.log").write_text("killed by the others\n")
    (logs / "rank_1.log").write_text(CHAINED)
    text = failure_text(tmp_path)
    assert text.startswith(str(logs / "rank_1.log")) and "ValueError" in text


def test_last_metrics_skips_eval_only_and_torn_lines(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 4, "loss": 1.5}) + "\n" + json.dumps({"step": 4, "eval_loss": 2.0})
        + "\n" + '{"step": 5, "lo')
    assert last_metrics(tmp_path) == {"step": 4, "loss": 1.5}
    assert last_metrics(tmp_path / "missing") == {}


def test_task_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = TrainerTask(config_path="unused", run_dir=str(tmp_path), max_requeues=0)
    assert task._finish(0, 0, []) == 0
    assert task._finish(1, EXIT_REQUEUE, []) == 0  # rank 0 decides; others leave cleanly
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "rank_1.log").write_text(CHAINED)
    with pytest.raises(RuntimeError, match="(?s)rank 1 failed with exit code 3 on .*ValueError"):
        task._finish(1, 3, [])
    # A trainer killed by SIGKILL (the OOM killer): said, and recorded for a sweep's summary.
    with pytest.raises(RuntimeError, match=r"rank 1 killed by signal 9 \(SIGKILL\): likely out of memory"):
        task._finish(1, 137, [])
    assert failure_line(tmp_path).startswith("rank 1 killed by signal 9 (SIGKILL)")
    monkeypatch.setitem(os.environ, "SLURM_JOB_ID", "12")
    # A time limit past cluster.max_requeues: not requeued (no scontrol is called).
    with pytest.raises(RuntimeError, match="cluster.max_requeues=0: not requeued"):
        task._finish(0, EXIT_REQUEUE, [signal.SIGUSR1])
