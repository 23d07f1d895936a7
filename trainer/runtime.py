"""Start-up and shut-down of one trainer process: config, threads, process groups, seeds."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from omegaconf import OmegaConf

from chatforge_config.trainer import Config


def load_config(path: str | Path) -> Config:
    """The resolved YAML the launcher wrote, checked against the schema (unknown keys and
    wrong types fail here, naming the key)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trainer: config file {path} does not exist")
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    return merged  # type: ignore[return-value]


@dataclass
class RunContext:
    cfg: Config
    run_dir: Path
    env: Any  # parallel.dist.DistEnv
    topo: Any  # parallel.groups.Topology
    device: Any  # torch.device
    # Set by the stage once its tokenizer is known; checkpoints carry a copy.
    tokenizer_path: Optional[Path] = None

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start(cfg: Config) -> RunContext:
    """Threads -> process group -> CPU compatibility -> TP/PP/DP groups -> seeds."""
    threads = int(cfg.cluster.threads_per_proc)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)
    from parallel import cpu_compat, dist
    from parallel.groups import init_groups

    env = dist.local_env()
    dist.init_distributed(env)
    cpu_compat.apply()
    topo = init_groups(cfg.model, cfg.parallel, seed=int(cfg.seed))
    seed_everything(int(cfg.seed))
    run_dir = Path(cfg.run.dir).resolve()
    return RunContext(cfg=cfg, run_dir=run_dir, env=env, topo=topo, device=dist.device())


def mark_done(ctx: RunContext, stage: str, steps: int) -> None:
    """Record that this run reached its end (exitcodes.DONE_FILE): what a recipe reads to
    skip a finished step. Rank 0 only; written after the last checkpoint or result."""
    if not ctx.is_main:
        return
    import json
    import time

    from trainer.data.indexed import atomic_write
    from trainer.exitcodes import DONE_FILE

    record = {"stage": stage, "steps": int(steps), "finished": time.time()}
    atomic_write(ctx.run_dir / DONE_FILE, (json.dumps(record) + "\n").encode("utf-8"))


def close(ctx: RunContext) -> None:
    from parallel import dist
    from parallel.groups import destroy_groups

    destroy_groups()
    dist.shutdown()


def config_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
