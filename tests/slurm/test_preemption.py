"""Preemption: a stop signal mid-run -> all ranks save the same step -> the job requeues
itself -> it resumes from that checkpoint -> the losses equal an uninterrupted run."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from launcher.jobs import FINAL, states
from launcher.failures import failure_text
from launcher.slurm_task import requeue_records
from tests.slurm.conftest import chatforge, losses, wait_until

RUN = ["model=tiny", "logger=none", "train.steps=150", "train.eval_every=0",
       "data.embedded.num_docs=300", "cluster.node_local_prefixes=[]"]


def _state(job: str) -> str:
    return states([job]).get(job, ("UNKNOWN",))[0]


def _final_state(job: str, timeout: float = 300) -> str:
    wait_until(lambda: _state(job) in FINAL, timeout, f"job {job} to end")
    return _state(job)


def _job_id(run_dir: Path) -> str:
    return str(json.loads((run_dir / "logs" / "slurm" / "job.json").read_text())["job_id"])


def _interrupt(run_dir: Path, env: dict[str, str], signal_name: str, after_step: int) -> str:
    """Wait until training passed `after_step`, then signal the job's steps like Slurm does."""
    job = _job_id(run_dir)
    wait_until(lambda: bool(losses(run_dir)) and max(losses(run_dir)) >= after_step
               if (run_dir / "metrics.jsonl").exists() else False, 240, f"step {after_step}")
    subprocess.run(["scancel", f"--signal={signal_name}", job], env=env, check=True)
    return job


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_losses(
        tmp_path: Path, slurm_env: dict[str, str]) -> None:
    reference = tmp_path / "reference"
    local = chatforge([*RUN, "cluster.procs_per_node=2", f"run.dir={reference}"], slurm_env,
                      tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    run_dir = tmp_path / "preempted"
    submit = chatforge([*RUN, "cluster=slurm", "cluster.nodes=2", "cluster.wait=false",
                        f"run.dir={run_dir}"], slurm_env, tmp_path)
    assert submit.returncode == 0, submit.stderr[-3000:]
    job = _interrupt(run_dir, slurm_env, "USR1", after_step=20)
    state = _final_state(job)
    assert state == "COMPLETED", f"job {job} {state}:\n{failure_text(run_dir)}"
    records = requeue_records(run_dir)
    assert [r["reason"] for r in records] == ["timeout"], records  # USR1: the time-limit warning
    log = (run_dir / "logs" / "rank_0.log").read_text()
    assert "restart 1 rank 0" in log, log[-2000:]
    assert "continuing at step" in log  # resumed from the checkpoint, not from scratch
    expected, got = losses(reference), losses(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, 151))
    for step, loss in expected.items():
        assert abs(got[step] - loss) < 1e-6, (step, got[step], loss)


def test_preemption_always_requeues_but_timeouts_only_max_requeues_times(
        tmp_path: Path, slurm_env: dict[str, str]) -> None:
    run_dir = tmp_path / "run"
    submit = chatforge([*RUN, "train.steps=400", "cluster=slurm", "cluster.max_requeues=0",
                        "cluster.wait=false", f"run.dir={run_dir}"], slurm_env, tmp_path)
    assert submit.returncode == 0, submit.stderr[-3000:]
    job = _interrupt(run_dir, slurm_env, "TERM", after_step=10)  # preemption's signal
    wait_until(lambda: len(requeue_records(run_dir)) == 1 or _state(job) in FINAL, 120,
               "the requeue")
    assert len(requeue_records(run_dir)) == 1, f"job {job} {_state(job)}:\n{failure_text(run_dir)}"
    wait_until(lambda: "restart 1 rank 0" in (run_dir / "logs" / "rank_0.log").read_text(),
               120, "the restart")
    resumed_at = max(losses(run_dir))
    _interrupt(run_dir, slurm_env, "USR1", after_step=resumed_at + 10)  # a time limit
    assert _final_state(job) == "FAILED"
    assert [r["reason"] for r in requeue_records(run_dir)] == ["preemption"]
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(steps) == 2 and steps[-1] != "step_000400", steps  # saved at both signals
    out = (run_dir / "logs" / "slurm" / f"{job}_0_log.out").read_text()
    assert "cluster.max_requeues=0: not requeued" in out
