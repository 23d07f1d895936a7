"""The watchdog on the dev Slurm: SIGSTOP one rank's trainer of a 2-node job after a checkpoint;
the task wrappers find it within train.hang_timeout + 30 s, name the rank, stop the job and
requeue it (cluster.max_requeues=1); the requeued job resumes from the last complete
checkpoint and reaches the losses of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from launcher.failures import failure_text
from launcher.slurm_task import requeue_records
from tests.slurm.conftest import chatforge, losses, wait_until
from tests.slurm.lease import pid_alive
from tests.slurm.test_preemption import _final_state, _job_id
from trainer.heartbeat import heartbeat_path, read_beat

HANG_TIMEOUT = 20
RUN = ["model=tiny", "logger=none", "train.steps=60", "train.eval_every=0", "ckpt.every=10",
       "data.embedded.num_docs=300", "cluster.node_local_prefixes=[]",
       f"train.hang_timeout={HANG_TIMEOUT}"]


def test_sigstopped_rank_ends_the_job_which_requeues_and_resumes(
        tmp_path: Path, slurm_env: dict[str, str]) -> None:
    reference = tmp_path / "reference"
    local = chatforge([*RUN, "cluster.procs_per_node=2", f"run.dir={reference}"], slurm_env, tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    run_dir = tmp_path / "hung"
    submit = chatforge([*RUN, "cluster=slurm", "cluster.nodes=2", "cluster.max_requeues=1",
                        "cluster.wait=false", f"run.dir={run_dir}"], slurm_env, tmp_path)
    assert submit.returncode == 0, submit.stderr[-3000:]
    job = _job_id(run_dir)
    latest, beat_path = run_dir / "checkpoints" / "latest", heartbeat_path(run_dir, 1)
    wait_until(latest.exists, 300, "a checkpoint")
    wait_until(lambda: getattr(read_beat(beat_path), "step", 0) > 12, 120, "rank 1 past it")
    beat = read_beat(beat_path)
    assert beat is not None
    os.kill(beat.pid, signal.SIGSTOP)  # the nodes share this machine's pid namespace
    stopped = time.time()
    wait_until(lambda: any(r["reason"] == "hang" for r in requeue_records(run_dir)),
               HANG_TIMEOUT + 60, "the hang's requeue")
    found = [r for r in requeue_records(run_dir) if r["reason"] == "hang"][0]["time"] - stopped
    print(f"dev Slurm: hang found and the job requeued {found:.1f} s after SIGSTOP")
    assert found < HANG_TIMEOUT + 30
    marker = json.loads((run_dir / "logs" / "slurm" / f"hang_{job}_0.json").read_text())
    assert marker["rank"] == 1 and marker["beat"]["host"] == beat.host
    assert _final_state(job, timeout=400) == "COMPLETED", failure_text(run_dir)
    assert not pid_alive(beat.pid)
    log = (run_dir / "logs" / "rank_0.log").read_text()
    # The task wrappers print to the job's output (submitit's logs/slurm/<job>_<task>_log.out).
    said = "".join(p.read_text(errors="replace") for p in (run_dir / "logs").rglob("*")
                   if p.is_file() and p.suffix in (".out", ".log"))
    assert f"watchdog: rank 1 on {beat.host}" in said and "requeued (hang)" in said, said[-3000:]
    assert "restart 1 rank 0" in log and "continuing at step" in log
    expected, got = losses(reference), losses(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, 61))
    for step, loss in expected.items():
        assert abs(got[step] - loss) < 1e-6, (step, got[step], loss)
