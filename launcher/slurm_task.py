"""What runs in each SLURM task (one per rank): the trainer, then the requeue decision.

The batch script (written and submitted by submitit) runs `srun ... python -u -m
launcher.slurm_task <run.dir>/logs/slurm` once per task. This entry reads task.json there
(not submitit's pickle: importing submitit, cloudpickle and numpy on every rank cost about a
second before the trainer even starts) and runs TrainerTask, which starts
`python -m trainer <run-dir>/config.yaml` with SLURM's environment
(the trainer derives its rank and rendezvous from SLURM_*), copies its output to
<run.dir>/logs/rank_N.log, and when the trainer exits with EXIT_REQUEUE after a signal,
global rank 0 requeues the job. Torch-free: it runs before (and around) the trainer.

Hangs: every task wrapper also runs the watchdog (launcher/watchdog.py) over every rank's
heartbeat in the shared run dir. A wrapper that finds a rank without progress for
train.hang_timeout seconds stops its own trainer (SIGTERM, SIGKILL after a grace) and exits
with EXIT_HANG; srun's --kill-on-bad-exit then ends every other task of the step. The first
wrapper to find it (an O_EXCL marker in logs/slurm/) says which rank, host and step, and
requeues the job while cluster.max_requeues allows (the run resumes from its last complete
checkpoint), recorded in requeues.jsonl with reason "hang".

Signals: Slurm delivers USR1 (cluster.signal_seconds before the time limit, or
`scancel --signal=USR1`) and SIGTERM (preemption, scancel) to every process of the step,
the trainer included, so this wrapper records them and does not forward them (forwarding
would deliver each one twice).
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

# EX_TEMPFAIL: the trainer saved a checkpoint after a stop signal; run it again. Torch-free.
from launcher.failures import clear_failure, death_line, log_tail, record_failure
from launcher.watchdog import Stall, Watchdog, descendants, process_state
from trainer.exitcodes import EXIT_HANG, EXIT_REQUEUE
from trainer.heartbeat import heartbeat_path, read_beat

TIMEOUT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
GRACE_S = 5.0  # a hung job's trainer: SIGTERM, then SIGKILL after this
# A task whose own trainer is not the stopped one waits this long before it reports the stall,
# so that the task that can see the culprit's process state names it.
DEFER_S = 3.0
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
POLL_S = 0.5


def job_state(job: str) -> str:
    """The job's state as slurmctld sees it now ("" if it cannot say)."""
    try:
        done = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
    except FileNotFoundError:
        return ""
    for field_text in done.stdout.split():
        if field_text.startswith("JobState="):
            return field_text.split("=", 1)[1]
    return ""


def requeue_log(run_dir: Path) -> Path:
    return run_dir / "logs" / "slurm" / "requeues.jsonl"


def requeue_records(run_dir: Path) -> list[dict[str, object]]:
    path = requeue_log(run_dir)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tee(pipe: IO[bytes], log: IO[bytes]) -> None:
    out = sys.stdout.buffer
    for chunk in iter(lambda: pipe.read1(65536), b""):  # type: ignore[attr-defined]
        log.write(chunk)
        log.flush()
        out.write(chunk)
        out.flush()


@dataclass
class TrainerTask:
    """Picklable (submitit sends it to the nodes); one instance serves every task."""

    config_path: str
    run_dir: str
    threads: int = 1
    max_requeues: int = 3
    hang_timeout: float = 0.0  # train.hang_timeout; 0: no watchdog
    python: str = field(default_factory=lambda: sys.executable)

    def __call__(self) -> int:
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        if rank == 0:
            clear_failure(Path(self.run_dir))  # an earlier attempt's verdict
        _become_subreaper()
        received: list[int] = []
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: received.append(signum))
        code = self._run_trainer(rank)
        return self._finish(rank, code, received)

    def _run_trainer(self, rank: int) -> int:
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS=str(self.threads), PYTHONUNBUFFERED="1")
        log_path = Path(self.run_dir) / "logs" / f"rank_{rank}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            job, restarts = os.environ.get("SLURM_JOB_ID", "?"), os.environ.get(
                "SLURM_RESTART_COUNT", "0")
            log.write(f"== chatforge: job {job} restart {restarts} rank {rank} on "
                      f"{socket.gethostname()} at {time.strftime('%F %T')}\n".encode())
            log.flush()
            proc = subprocess.Popen([self.python, "-m", "trainer", self.config_path],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=env)
            self._trainer_pid = proc.pid
            assert proc.stdout is not None
            tee = threading.Thread(target=_tee, args=(proc.stdout, log), daemon=True)
            tee.start()
            code = self._watch(proc, rank)
            _stop_leftovers()  # before the join: a leftover helper holds the pipe open
            tee.join(timeout=10)
        return code if code >= 0 else 128 - code

    def _watch(self, proc: subprocess.Popen, rank: int) -> int:
        """Wait for the trainer; EXIT_HANG after stopping it when the watchdog finds a stall."""
        world = int(os.environ.get("SLURM_NTASKS", "1"))
        watchdog = Watchdog(Path(self.run_dir), world, self.hang_timeout)
        while True:
            try:
                return proc.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                pass
            except InterruptedError:  # a recorded signal; keep waiting for the trainer
                continue
            stall = watchdog.poll(state=lambda r: process_state(proc.pid) if r == rank else "")
            if stall is None:
                continue
            if stall.rank != rank or stall.state not in ("T", "t"):
                time.sleep(DEFER_S)
            self._hang(stall)
            helpers = descendants(proc.pid)  # before the trainer dies and they are reparented
            proc.terminate()
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()  # a stopped trainer, or one blocked in a collective
                proc.wait()
            for pid in helpers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return EXIT_HANG

    def _hang(self, stall: Stall) -> None:
        """Said and acted on once per job attempt, by whichever task found the stall first."""
        run_dir, job = Path(self.run_dir), os.environ.get("SLURM_JOB_ID", "")
        restart = os.environ.get("SLURM_RESTART_COUNT", "0") or "0"
        marker = requeue_log(run_dir).with_name(f"hang_{job}_{restart}.json")
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps({"rank": stall.rank, "silent_s": stall.silent_s,
                                     "beat": stall.beat.__dict__ if stall.beat else None}))
        hangs = sum(1 for r in requeue_records(run_dir)
                    if r.get("reason") == "hang" and str(r.get("job")) == job)
        line = f"{stall.message(self.hang_timeout)}; stopping job {job} (exit {EXIT_HANG})"
        record_failure(run_dir, stall.rank, EXIT_HANG, line)
        print(f"chatforge: {line}", flush=True)
        if hangs >= self.max_requeues or not job:
            print(f"chatforge: not requeued (cluster.max_requeues={self.max_requeues}); rerun "
                  f"the same command to resume from the last complete checkpoint", flush=True)
            return
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if done.returncode == 0:
            _record_requeue(run_dir, job, "hang", [])
            print(f"chatforge: job {job} requeued (hang); it resumes from the last complete "
                  f"checkpoint", flush=True)
        else:
            print(f"chatforge: scontrol requeue {job}: {done.stderr.strip()}", flush=True)

    def _finish(self, rank: int, code: int, received: list[int]) -> int:
        """The task's exit code; raises with the trainer's traceback when it failed."""
        run_dir = Path(self.run_dir)
        if code in (0, EXIT_HANG):
            return code  # a hang was reported by the task that found it (_hang)
        log = run_dir / "logs" / f"rank_{rank}.log"
        if code != EXIT_REQUEUE:
            beat = read_beat(heartbeat_path(run_dir, rank))
            if beat is None or beat.pid != getattr(self, "_trainer_pid", None):
                beat = None  # an earlier attempt's
            line = death_line(rank, code, beat)
            record_failure(run_dir, rank, code, line)
            where = "" if beat else f" on {socket.gethostname()}"
            raise RuntimeError(f"{line}{where}; last lines of {log}:\n{log_tail(log)}")
        if rank != 0:
            return 0  # rank 0 decides; a clean exit keeps srun from killing it first
        reason = "timeout" if any(s in TIMEOUT_SIGNALS for s in received) else "preemption"
        job = os.environ.get("SLURM_JOB_ID", "")
        timeouts = sum(1 for r in requeue_records(run_dir)
                       if r.get("reason") == "timeout" and str(r.get("job")) == job)
        if reason == "timeout" and timeouts >= self.max_requeues:
            raise RuntimeError(f"time limit reached {timeouts + 1} times; cluster.max_requeues="
                               f"{self.max_requeues}: not requeued. The checkpoint is in "
                               f"{run_dir}/checkpoints; rerun the same command to resume.")
        state = job_state(job)
        if not (state.startswith("RUNNING") or "PREEMPT" in state):
            # A plain scancel's SIGTERM looks like preemption to the trainer, and slurmctld
            # accepts `scontrol requeue` of a job it is ending (state COMPLETING): seen on the
            # dev cluster, the cancelled job came back. Requeue only a job that is still
            # running (signal-only: time-limit warning, `scancel --signal`) or preempted.
            print(f"chatforge: job {job} is {state or 'gone'} (cancelled?); checkpoint saved, "
                  "not requeued", flush=True)
            return 0
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if done.returncode != 0:
            # slurmctld refused (e.g. the job ended meanwhile): report it, keep the checkpoint.
            raise RuntimeError(f"stopped after a checkpoint; not requeued ({reason}): "
                               f"scontrol requeue {job}: {done.stderr.strip()}")
        # Recorded only once requeued (a cancelled run is not a timeout to count); SLURM now
        # stops this job, with KillWait seconds to spare for these few bytes.
        _record_requeue(run_dir, job, reason, received)
        print(f"chatforge: job {job} requeued ({reason}); it resumes from the checkpoint",
              flush=True)
        # Not a return: submitit would record a result and the requeued run would look done.
        os._exit(EXIT_REQUEUE)


def _become_subreaper() -> None:
    """Linux: the trainer's helper processes (checkpoint writers, multiprocessing's resource
    tracker) that outlive it, e.g. when the OOM killer took the trainer, become children of
    this wrapper instead of init's, so _stop_leftovers finds them. Slurm's proctrack/cgroup
    would end them with the step; proctrack/linuxproc (the dev cluster's) loses orphans."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _stop_leftovers(wait_s: float = 2.0) -> None:
    """SIGKILL whatever the finished trainer left behind (they ignore the stop signals), and
    reap them: no process of the job outlives its task."""
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no children left
        if pid == 0:
            time.sleep(0.02)


def _record_requeue(run_dir: Path, job: str, reason: str, received: list[int]) -> None:
    record = {"job": job, "reason": reason, "time": time.time(),
              "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
              "signals": [signal.Signals(s).name for s in received]}
    path = requeue_log(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


TASK_FILE = "task.json"


def main(argv: list[str]) -> int:
    """`python -m launcher.slurm_task <folder>`: run this task's rank from <folder>/task.json."""
    spec = json.loads((Path(argv[0]) / TASK_FILE).read_text())
    try:
        return TrainerTask(**spec)()
    except RuntimeError as error:
        print(f"chatforge: {error}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
