"""Schema owned by the launcher: where and how many processes run, and on SLURM how they
are asked for. Every default is written here once; conf/cluster/*.yaml only hold values."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ClusterConfig:
    name: str = "local"  # local | slurm
    nodes: int = 1
    # Ranks per node: one per GPU, or per process on CPU (SLURM's --ntasks-per-node).
    procs_per_node: int = 1
    # Torch intra-op threads per process. One thread per process is fastest on small CPUs.
    threads_per_proc: int = 1

    # ---- SLURM (cluster=slurm); passed to sbatch through submitit ----
    gpus_per_node: int = 0  # --gpus-per-node; 0 = CPU job (gloo)
    # --cpus-per-task; None asks for threads_per_proc.
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None  # --mem per node; None: the partition's default
    time_min: int = 60  # --time, minutes
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: bool = False
    job_name: str = ""  # empty: chatforge-<last part of run.dir>
    # Extra sbatch options as {option: value} without dashes, e.g. {mail-type: END}.
    sbatch_extra: dict[str, str] = field(default_factory=dict)
    # Extra srun arguments, one list item per argument, e.g. [--cpu-bind=cores].
    srun_extra: list[str] = field(default_factory=list)
    # Shell lines run in the batch script before srun (module load, export ...): the one
    # place where config is shell on purpose; everything else is quoted.
    setup: list[str] = field(default_factory=list)
    # Run every rank in this container (pyxis/enroot's srun --container-image).
    container_image: Optional[str] = None
    container_mounts: Optional[str] = None
    # SLURM sends SIGUSR1 this many seconds before the time limit; the trainer checkpoints
    # and the job is requeued (at most max_requeues times for time limits; preemptions always).
    signal_seconds: int = 120
    max_requeues: int = 3
    # Block until the job ends (follow rank 0's log); false returns after submission.
    wait: bool = True
    # The run dir must be visible to every node: paths under these prefixes are node-local
    # on most clusters and rejected for cluster=slurm (the dev cluster shares them; set []).
    node_local_prefixes: list[str] = field(
        default_factory=lambda: ["/tmp", "/var/tmp", "/dev/shm"])

    # ---- hardware model for `chatforge plan` and the memory check ----
    gpu_memory_gb: float = 80.0  # per device (H100 80GB)
    peak_tflops: float = 989.0  # per device, dense bf16 (H100 SXM); fp32 runs use it too
    mfu: float = 0.4  # model FLOPs utilisation assumed for step time
    price_per_gpu_hour: float = 2.0  # currency units, for the cost line


@dataclass
class RecipeStep:
    """One step of a recipe: an ordinary chatforge run in <run.dir>/<step name>/."""

    stage: str = ""  # a conf/stage option
    # Config key -> the step whose output it reads (ckpt.load: sft, ppo.reward: rm), or
    # several, comma-separated, for list-valued keys (eval.models). The value becomes that
    # step's run dir (tokenizer.path: its tokenizer file).
    inputs: dict[str, str] = field(default_factory=dict)
    # The recipe's own overrides for this step (Hydra syntax, e.g. train.steps=300).
    overrides: list[str] = field(default_factory=list)
    # The user's, applied last: recipe.steps.sft.extra=[data=chatml,data.path=chats.jsonl].
    extra: list[str] = field(default_factory=list)


@dataclass
class RecipeConfig:
    """`chatforge recipe=<name>`: a chain of steps (conf/recipe/, launcher/recipe.py).
    Command-line overrides apply to every step and win over the recipe's own."""

    name: str = ""  # empty: no recipe (one run of `stage`)
    # Overrides every step gets first (a step's own and the command line's win over them).
    common: list[str] = field(default_factory=list)
    steps: dict[str, RecipeStep] = field(default_factory=dict)
    # Run only these steps (empty: all); the others' outputs are used if they finished.
    only: list[str] = field(default_factory=list)
