"""The hang watchdog in several processes: SIGSTOP one rank of a DP2 job after a checkpoint was
saved; the local launcher finds it within train.hang_timeout + 30 s, names the rank, its host
and its last step, stops every rank (no process of the job is left) with EXIT_HANG, the last
complete checkpoint verifies, and rerunning resumes to the same final loss as a run that was
never stopped."""
from __future__ import annotations

import copy
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import REPO, read_metrics, run_trainer, write_config
from trainer.checkpoint_files import verify
from trainer.exitcodes import EXIT_HANG
from trainer.heartbeat import heartbeat_path, read_beat

pytestmark = pytest.mark.dist

# A few seconds, yet above this CPU's slowest save of the tiny model (the first: 5 s when
# the machine is busy): a save is not a hang.
HANG_TIMEOUT = 8.0
STEPS = 40
BASE: dict[str, Any] = {
    "logger": "none", "seed": 5,
    "model": {"num_layers": 2, "seq_length": 32, "hidden_size": 32},
    "train": {"steps": STEPS, "global_batch": 4, "micro_batch": 2, "eval_every": 0,
              "hang_timeout": HANG_TIMEOUT},
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "data": {"embedded": {"num_docs": 200}},
    "ckpt": {"every": 4, "keep": 2},
}



def _job_processes() -> list[psutil.Process]:
    """This process's descendants but the session's trainer zygote (tests/conftest.py), which
    outlives every job; the ranks it forks are its children and so are listed."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "launcher.zygote" not in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found

def _wait(what: str, ok: Any, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not ok():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_sigstopped_rank_is_found_and_every_rank_stopped(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from launcher.local import run_local

    run_dir = tmp_path / "run"
    path = write_config(run_dir, copy.deepcopy(BASE))
    result: dict[str, Any] = {}

    def launch() -> None:
        result["code"] = run_local([sys.executable, "-m", "trainer", str(path)], 2, run_dir,
                                   env_extra={"PYTHONPATH": str(REPO)}, threads=1,
                                   hang_timeout=HANG_TIMEOUT)
        result["returned"] = time.monotonic()

    launcher = threading.Thread(target=launch)
    launcher.start()
    latest = run_dir / "checkpoints" / "latest"
    beat_path = heartbeat_path(run_dir, 1)
    _wait("a checkpoint", latest.exists)
    # Stopped in a plain step after the save, so the stall is rank 1's own (rank 0 then waits
    # in the next collective).
    _wait("rank 1 past the checkpoint", lambda: getattr(read_beat(beat_path), "step", 0) > 5)
    beat = read_beat(beat_path)
    assert beat is not None and beat.host == socket.gethostname()
    job = _job_processes()  # the ranks and anything they started
    assert len(job) >= 2
    os.kill(beat.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    launcher.join(timeout=HANG_TIMEOUT + 60)
    assert not launcher.is_alive(), "the launcher never returned"
    took = result["returned"] - stopped
    said = capsys.readouterr().err
    print(f"hang found and every rank stopped {took:.1f} s after SIGSTOP (timeout {HANG_TIMEOUT} s)")
    assert result["code"] == EXIT_HANG
    assert took < HANG_TIMEOUT + 30
    match = re.search(rf"watchdog: rank 1 on {re.escape(beat.host)} \(pid {beat.pid}\), last step (\d+)"
                      rf"[^:]*\(its process is stopped\): no progress for \d+ s \(train.hang_timeout=8\)"
                      rf".*; stopped every rank \(exit 77\)", said)
    assert match, said[-2000:]
    assert int(match.group(1)) >= beat.step
    assert "rerun the same command to resume" in said
    # No process of the job is left: not the stopped rank, not its peer, no helper.
    alive = [p for p in job if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], alive
    assert _job_processes() == []
    # The last complete checkpoint is intact and resumes to the uninterrupted run's loss.
    saved = latest.parent / latest.read_text().strip()
    assert verify(saved) == [], saved
    resumed = run_trainer(run_dir, copy.deepcopy(BASE), world_size=2)
    straight = run_trainer(tmp_path / "straight", copy.deepcopy(BASE), world_size=2)
    assert resumed[-1]["step"] == straight[-1]["step"] == STEPS
    assert resumed[-1]["loss"] == pytest.approx(straight[-1]["loss"], rel=1e-6)
    log = (run_dir / "logs" / "rank_0.log").read_text()
    assert re.search(r"continuing at step (\d+)", log), "the rerun did not resume"


def test_slurm_task_wrappers_stop_a_hung_job(tmp_path: Path) -> None:
    """The SLURM side without a cluster: two task wrappers (launcher.slurm_task, as srun starts
    them, with SLURM_PROCID/SLURM_NTASKS) watch every rank's heartbeat; SIGSTOP one trainer
    and both wrappers stop their trainers and exit with EXIT_HANG (under srun,
    --kill-on-bad-exit ends the step at the first), the one that found it first says which
    rank, and no job id means no requeue is tried."""
    import json
    import subprocess

    from launcher.local import free_port
    from launcher.slurm_task import TASK_FILE

    run_dir = tmp_path / "run"
    path = write_config(run_dir, copy.deepcopy(BASE))
    folder = run_dir / "logs" / "slurm"
    folder.mkdir(parents=True)
    (folder / TASK_FILE).write_text(json.dumps({
        "config_path": str(path), "run_dir": str(run_dir), "threads": 1, "max_requeues": 0,
        "hang_timeout": HANG_TIMEOUT, "python": sys.executable}))
    port = free_port()
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "SLURM_JOB_ID")}
    wrappers = [subprocess.Popen(
        [sys.executable, "-m", "launcher.slurm_task", str(folder)], cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO), "SLURM_PROCID": str(r), "SLURM_NTASKS": "2",
             "SLURM_LOCALID": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True) for r in range(2)]
    beat_path = heartbeat_path(run_dir, 1)
    try:
        _wait("rank 1 past the checkpoint", lambda: getattr(read_beat(beat_path), "step", 0) > 5)
        beat = read_beat(beat_path)
        assert beat is not None
        job = [child for w in wrappers for child in psutil.Process(w.pid).children(recursive=True)]
        os.kill(beat.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        outputs = [w.communicate(timeout=HANG_TIMEOUT + 60)[0].decode(errors="replace") for w in wrappers]
        took = time.monotonic() - stopped
    finally:
        for w in wrappers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
    print(f"slurm task wrappers: hang found and both exited {took:.1f} s after SIGSTOP")
    assert [w.returncode for w in wrappers] == [EXIT_HANG, EXIT_HANG], outputs
    said = "".join(outputs)
    assert said.count("chatforge: watchdog: rank 1 on ") == 1, said[-3000:]
    assert "(its process is stopped)" in said or "likely waiting for it" in said
    assert "not requeued (cluster.max_requeues=0)" in said
    assert took < HANG_TIMEOUT + 30
    alive = [p for p in job if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], alive
