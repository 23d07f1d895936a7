"""cluster=slurm: submit one job per run (per sweep point) through submitit, then follow it.

The batch script is submitit's: #SBATCH lines from cluster.* (values shell-quoted by
submitit), cluster.setup lines, then `srun ... python -u -m launcher.slurm_task <folder>`,
which runs launcher.slurm_task.TrainerTask in every task. The submitit folder (pickles,
per-task output) is <run.dir>/logs/slurm/; the job id is recorded in
<run.dir>/logs/slurm/job.json and in the user's job index (see launcher.jobs).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig

from launcher.jobs import FINAL, states
from launcher.failures import failure_text
from launcher.slurm_task import TASK_FILE, TrainerTask



def job_name(cfg: DictConfig) -> str:
    return str(cfg.cluster.job_name or f"chatforge-{Path(str(cfg.run.dir)).name}")


def srun_args(cfg: DictConfig) -> list[str]:
    """srun arguments (submitit quotes each one). --kill-on-bad-exit: a rank that dies stops
    the others at once instead of leaving them blocked in a collective until the timeout."""
    args = ["--kill-on-bad-exit=1"]
    c = cfg.cluster
    if c.container_image:
        args.append(f"--container-image={c.container_image}")
    if c.container_mounts:
        args.append(f"--container-mounts={c.container_mounts}")
    return args + [str(arg) for arg in c.srun_extra]


def executor_parameters(cfg: DictConfig, after: Sequence[str] = ()) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for this run: the one mapping from cluster.* keys
    to sbatch options (validate_cluster.OWNED_SBATCH lists the options taken here). `after`:
    job ids that must complete first (a recipe step's inputs)."""
    c = cfg.cluster
    params: dict[str, Any] = {
        "job_name": job_name(cfg),
        "nodes": int(c.nodes),
        "ntasks_per_node": int(c.procs_per_node),
        "cpus_per_task": int(c.cpus_per_task or c.threads_per_proc),
        "time": int(c.time_min),
        "stderr_to_stdout": True,
        "setup": [str(line) for line in c.setup],
        "srun_args": srun_args(cfg),
    }
    optional = {"partition": c.partition, "account": c.account, "qos": c.qos,
                "constraint": c.constraint}
    params.update({key: str(value) for key, value in optional.items() if value is not None})
    if int(c.gpus_per_node) > 0:
        params["gpus_per_node"] = int(c.gpus_per_node)
    if c.mem_gb is not None:
        params["mem"] = f"{int(float(c.mem_gb) * 1024)}M"
    if c.exclusive:
        params["exclusive"] = True
    extra: dict[str, Any] = {str(k): str(v) for k, v in (c.sbatch_extra or {}).items()}
    # Our USR1 replaces submitit's default USR2@90 (the trainer handles USR1 and SIGTERM);
    # --requeue lets `scontrol requeue` work where the site default is JobRequeue=0.
    extra.update({"signal": f"USR1@{int(c.signal_seconds)}", "requeue": True})
    if after:
        # kill-on-invalid-dep: when an input fails, its dependents end (CANCELLED) instead of
        # pending forever with DependencyNeverSatisfied; rerunning the recipe resubmits them.
        extra.update({"dependency": "afterok:" + ":".join(after), "kill-on-invalid-dep": "yes"})
    params["additional_parameters"] = extra
    return params


def task_command(python: str, folder: Path) -> str:
    """What srun runs in every task: our light entry instead of submitit's unpickler."""
    return " ".join([python, "-u -m launcher.slurm_task", shlex.quote(str(folder))])


def make_executor(cfg: DictConfig, folder: Path, after: Sequence[str] = ()) -> Any:
    import submitit

    class Executor(submitit.SlurmExecutor):  # type: ignore[misc]
        @property
        def _submitit_command_str(self) -> str:
            return task_command(self.python, Path(self.folder))

    python = None
    if cfg.cluster.container_image:
        python = "python3"  # the image's interpreter, which must have chatforge installed
    executor = Executor(folder=folder, max_num_timeout=int(cfg.cluster.max_requeues),
                        python=python)
    executor.update_parameters(**executor_parameters(cfg, after))
    return executor


@dataclass
class Submitted:
    job_id: str
    run_dir: Path
    job: Any  # submitit.SlurmJob


def submit(cfg: DictConfig, config_path: Path, after: Sequence[str] = (), step: str = "") -> Submitted:
    """Submit the run; returns at once (the job may still be pending). `after`: job ids that
    must complete successfully first (a recipe's inputs); `step`: its recipe step name."""
    from launcher.jobs import record_job

    run_dir = Path(str(cfg.run.dir))
    folder = run_dir / "logs" / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    task = TrainerTask(config_path=str(config_path), run_dir=str(run_dir),
                       threads=int(cfg.cluster.threads_per_proc),
                       max_requeues=int(cfg.cluster.max_requeues),
                       hang_timeout=float(cfg.train.hang_timeout),
                       python=sys.executable if not cfg.cluster.container_image else "python3")
    (folder / TASK_FILE).write_text(json.dumps(asdict(task)))
    # submitit pickles the callable too; the tasks read task.json (see launcher.slurm_task),
    # so job.result() is not used: states come from sacct.
    job = make_executor(cfg, folder, after).submit(task)
    info = {"job_id": str(job.job_id), "run_dir": str(run_dir), "name": job_name(cfg),
            "nodes": int(cfg.cluster.nodes), "procs_per_node": int(cfg.cluster.procs_per_node),
            "submitted": time.time(), "folder": str(folder), "after": list(after), "step": step}
    tmp = folder / f".job.json.{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, folder / "job.json")
    record_job(info)
    return Submitted(str(job.job_id), run_dir, job)


def job_state(job_id: str) -> str:
    """The job's state from sacct (squeue as a fallback), e.g. RUNNING, COMPLETED."""
    return states([job_id]).get(job_id, ("UNKNOWN", ""))[0]


class _Follower:
    """Copies new bytes of a growing log to the console (rank 0's progress lines)."""

    def __init__(self, path: Path, start_at_end: bool) -> None:
        self.path = path
        self.offset = path.stat().st_size if start_at_end and path.exists() else 0

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except OSError:
            return
        if data:
            self.offset += len(data)
            sys.stdout.buffer.write(data)
            sys.stdout.flush()


def wait(sub: Submitted, follow: bool = True, poll_s: float = 1.0) -> int:
    """Wait until the job ends (requeues included); 0 if it completed. Rank 0's log is
    followed on the console; a failure prints the failing rank's traceback."""
    follower = _Follower(sub.run_dir / "logs" / "rank_0.log", start_at_end=True)
    state = "PENDING"
    try:
        while True:
            if follow:
                follower.poll()
            state = job_state(sub.job_id)
            if state in FINAL:
                break
            time.sleep(poll_s)
            poll_s = min(poll_s * 1.1, 10.0)  # gentle on a real cluster's slurmctld
    except KeyboardInterrupt:  # stop following, not the job: it is not ours to kill here
        print(f"\nchatforge: stopped following job {sub.job_id}; it keeps running "
              f"(chatforge cancel {shlex.quote(str(sub.run_dir))})", file=sys.stderr)
        return 130
    if follow:
        follower.poll()
    if state == "COMPLETED":
        return 0
    print(f"chatforge: job {sub.job_id} ended {state}\n{failure_text(sub.run_dir)}",
          file=sys.stderr)
    return 1


def run_on_slurm(cfg: DictConfig, config_path: Path) -> int:
    """The cluster=slurm backend of launcher.cli: submit, then wait unless cluster.wait=false."""
    sub = submit(cfg, config_path)
    print(f"chatforge: submitted job {sub.job_id} ({job_name(cfg)}, {cfg.cluster.nodes} node(s) "
          f"x {cfg.cluster.procs_per_node}); run dir {sub.run_dir}\n"
          f"  chatforge logs {shlex.quote(str(sub.run_dir))}   chatforge cancel "
          f"{shlex.quote(str(sub.run_dir))}", flush=True)
    if not cfg.cluster.wait:
        return 0
    return wait(sub)


def sbatch_script(cfg: DictConfig) -> str:
    """The batch script submitit would write for `cfg` (shown by `chatforge plan`)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = dict(executor_parameters(cfg))
    folder = Path(str(cfg.run.dir)) / "logs" / "slurm"
    python = "python3" if cfg.cluster.container_image else shlex.quote(sys.executable)
    command = task_command(python, folder)
    return str(_make_sbatch_string(command=command, folder=folder, **params))


def active_job(run_dir: Path) -> Optional[str]:
    """The job id of the run's last submission if it is still queued or running."""
    path = run_dir / "logs" / "slurm" / "job.json"
    if not path.is_file():
        return None
    job_id = str(json.loads(path.read_text())["job_id"])
    return None if job_state(job_id) in FINAL | {"UNKNOWN"} else job_id


def run_recipe_on_slurm(steps: list[Any], root: Path, wait_for_all: bool) -> int:
    """Submit a recipe's unfinished steps as a chain of dependent jobs (launcher.recipe),
    then, with cluster.wait, follow them in order until the last one ends."""
    from launcher.recipe import REPORT, submit_steps
    from launcher.resolved import write_resolved_config

    def submit_step(cfg: DictConfig, step: Any, after: list[str]) -> str:
        return submit(cfg, write_resolved_config(cfg, Path(str(cfg.run.dir))), after, step.name).job_id

    jobs = submit_steps(steps, root, submit_step, active_job)
    print(f"chatforge: recipe submitted in {root}: {len(jobs)} job(s); chatforge jobs shows the chain", flush=True)
    if not wait_for_all:
        return 0
    for step in steps:
        if step.name in jobs:
            print(f"chatforge: following recipe step {step.name} (job {jobs[step.name]})", flush=True)
            code = wait(Submitted(jobs[step.name], step.run_dir, None))
            if code:
                return code
    print(f"chatforge: recipe done; report: {root / REPORT}", flush=True)
    return 0
