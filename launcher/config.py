"""Schema owned by the launcher: where and how many processes run."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ClusterConfig:
    name: str = "local"  # local | slurm
    nodes: int = 1
    procs_per_node: int = 1
    # Torch intra-op threads per process. One thread per process is fastest on small CPUs.
    threads_per_proc: int = 1
