"""`chatforge jobs`, `logs` and `cancel` against the real cluster; a cancelled run stays
cancelled (its SIGTERM looks like preemption to the trainer, but a cancelled job cannot be
requeued)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from launcher.jobs import states
from launcher.slurm_task import requeue_records
from tests.slurm.conftest import chatforge, losses, wait_until


def test_jobs_logs_and_cancel(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    run_dir = tmp_path / "long"
    submit = chatforge(["model=tiny", "logger=none", "train.steps=2000", "train.eval_every=0",
                        "data.embedded.num_docs=300", "cluster=slurm", "cluster.nodes=2",
                        "cluster.wait=false", "cluster.node_local_prefixes=[]",
                        f"run.dir={run_dir}"], slurm_env, tmp_path)
    assert submit.returncode == 0, submit.stderr[-3000:]
    job = str(json.loads((run_dir / "logs/slurm/job.json").read_text())["job_id"])
    wait_until(lambda: (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= 3,
               240, "training to start")
    listing = chatforge(["jobs"], slurm_env, tmp_path)
    row = next(line for line in listing.stdout.splitlines() if line.startswith(job + " "))
    assert "RUNNING" in row and "n[1-2]" in row and str(run_dir) in row, listing.stdout
    step, loss = row.split()[4], row.split()[5]  # JOBID STATE AFTER NODES STEP LOSS ...
    assert int(step) >= 3 and float(loss) > 0
    logs = chatforge(["logs", str(run_dir)], slurm_env, tmp_path)
    assert logs.returncode == 0 and "step 3/2000" in logs.stdout
    by_id = chatforge(["logs", job, "--rank", "1"], slurm_env, tmp_path)
    assert f"job {job} restart 0 rank 1 on n2" in by_id.stdout
    cancel = chatforge(["cancel", str(run_dir)], slurm_env, tmp_path)
    assert cancel.returncode == 0, cancel.stderr
    wait_until(lambda: states([job]).get(job, ("",))[0] == "CANCELLED", 60, "the cancel")
    # The trainer gets SIGTERM as on preemption (and may save within KillWait), but a
    # cancelled job is not requeued.
    wait_until(lambda: "restart 0 rank 0" in (run_dir / "logs/rank_0.log").read_text(), 5, "log")
    time.sleep(8)  # longer than KillWait (5 s): any requeue would have happened by now
    assert requeue_records(run_dir) == []
    assert states([job])[job][0] == "CANCELLED"
    out = (run_dir / "logs/slurm" / f"{job}_0_log.out").read_text()
    assert "restart 1" not in (run_dir / "logs/rank_0.log").read_text(), out[-2000:]
