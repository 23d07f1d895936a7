"""A Hydra multirun on SLURM: every point its own job and run dir; one point raises."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.slurm.conftest import chatforge


def test_three_point_sweep_with_a_failing_point(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    sweep = tmp_path / "sweep"
    # vocab 99999 passes the launcher's checks but is too large for this corpus: the
    # trainer (sentencepiece) raises on that point only.
    proc = chatforge(["-m", "model=tiny", "logger=none", "train.steps=3", "train.eval_every=0",
                      "data.embedded.num_docs=300", "cluster=slurm",
                      "cluster.node_local_prefixes=[]", f"run.dir={sweep}",
                      "tokenizer.vocab_size=384,99999,512"], slurm_env, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    records = json.loads((sweep / "summary.json").read_text())
    assert [r["ok"] for r in records] == [True, False, True], out[-3000:]
    assert [r["state"] for r in records] == ["COMPLETED", "FAILED", "COMPLETED"]
    assert all(r["step"] == 3 for r in records if r["ok"])
    assert sum(r["best"] for r in records) == 1 and not records[1]["best"]
    # Each point ran as its own SLURM job in its own run dir.
    ids = [r["job_id"] for r in records]
    assert len(set(ids)) == 3
    for num, record in enumerate(records):
        assert record["run_dir"] == str(sweep / str(num))
        job = json.loads((sweep / str(num) / "logs" / "slurm" / "job.json").read_text())
        assert job["job_id"] == record["job_id"]
    summary = (sweep / "summary.md").read_text()
    assert "### point 1 failed (tokenizer.vocab_size=99999)" in summary
    assert "Traceback (most recent call last)" in summary
    assert "tokenizer.vocab_size=99999 does not fit this corpus" in summary
    assert "1 of 3 sweep points failed: 1" in proc.stderr
    sacct = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
                           env=slurm_env, capture_output=True, text=True).stdout
    assert sorted(sacct.split()) == sorted(f"{i}|{s}" for i, s in zip(
        ids, ("COMPLETED", "FAILED", "COMPLETED")))


def test_sweep_points_that_die_hard_then_rerun(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    """4 points as jobs (train.fault.crash): 2 complete, one raises, one is SIGKILLed; the
    summary names both failures, the sweep exits 1, and the same command again submits only
    the two failed points (the drill fires once per run dir) and exits 0."""
    import re

    sweep = tmp_path / "sweep"
    command = ["-m", "model=tiny", "logger=none", "train.steps=3", "train.eval_every=0",
               "data.embedded.num_docs=300", "cluster=slurm", "cluster.node_local_prefixes=[]",
               "tokenizer.vocab_size=384", f"run.dir={sweep}",
               "train.fault.crash=none,raise@2,kill@2,none"]
    proc = chatforge(command, slurm_env, tmp_path, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    records = json.loads((sweep / "summary.json").read_text())
    assert [r["state"] for r in records] == ["COMPLETED", "FAILED", "FAILED", "COMPLETED"], out[-3000:]
    summary = (sweep / "summary.md").read_text()
    assert "RuntimeError: fault injection: train.fault.crash=raise@2 on rank 0" in summary
    assert re.search(r"rank 0 on \S+ \(pid \d+\), last step 2, memory high-water mark \d+ MiB "
                     r"killed by signal 9 \(SIGKILL\): likely out of memory", summary), summary
    assert "2 of 4 sweep points failed: 1, 2" in proc.stderr
    first_ids = [r["job_id"] for r in records]
    rerun = chatforge(command, slurm_env, tmp_path, timeout=600)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    records = json.loads((sweep / "summary.json").read_text())
    assert [r["state"] for r in records] == ["already done", "COMPLETED", "COMPLETED", "already done"]
    assert "2 of 4 sweep points were already done: 0, 3" in rerun.stdout
    ids = [r["job_id"] for r in records]
    assert ids[0] is None and ids[3] is None  # not submitted again
    assert ids[1] not in first_ids and ids[2] not in first_ids
    # No process of any of these jobs is left (the killed trainer's helpers included).
    import psutil

    jobs = {str(i) for i in first_ids + ids if i}
    left = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SLURM_JOB_ID") in jobs:
                left.append(proc.cmdline())
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    assert left == [], left
