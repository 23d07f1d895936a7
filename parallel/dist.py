"""Distributed start-up from the environment: single process, torchrun, or SLURM."""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # single | torchrun | slurm

    @property
    def backend(self) -> str:
        return "nccl" if torch.cuda.is_available() else "gloo"


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list, e.g. 'gpu[003-005,9],cpu1' -> 'gpu003'.

    Only the first host is needed (it runs rank 0), so scontrol is not required."""
    nodelist = nodelist.strip()
    match = re.match(r"^([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot parse a host name")
    prefix, bracket = match.group(1), match.group(3)
    if bracket is None:
        return prefix
    first = bracket.split(",")[0].split("-")[0]
    return prefix + first


def env_from(environ: Mapping[str, str]) -> DistEnv:
    """Read the rank layout: torchrun-style variables win over SLURM's (srun sets SLURM_*
    even when a user wraps torchrun inside it)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", "0")),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", DEFAULT_PORT)),
            source="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST", environ.get("SLURM_NODELIST", ""))
        addr = environ.get("MASTER_ADDR") or (first_slurm_host(nodelist) if nodelist else "127.0.0.1")
        # A port derived from the job id lets two jobs share a node without colliding.
        job_id = int(environ.get("SLURM_JOB_ID", "0") or 0)
        port = int(environ.get("MASTER_PORT", 20000 + job_id % 20000))
        return DistEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_NTASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", "0")),
            master_addr=addr,
            master_port=port,
            source="slurm",
        )
    return DistEnv(0, 1, 0, "127.0.0.1", int(environ.get("MASTER_PORT", 0) or 0), "single")


def init_distributed(env: DistEnv, timeout_minutes: float = 10.0) -> None:
    """Start the default process group (also for one process: megatron needs one)."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    port = env.master_port
    if env.source == "single" and port == 0:
        port = _free_port()
    dist.init_process_group(
        backend=env.backend,
        init_method=f"tcp://{env.master_addr}:{port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_env() -> DistEnv:
    return env_from(os.environ)


def gather_lists(mine: list[Any]) -> list[Any]:
    """Every rank's list, concatenated in rank order, on every rank (one all_gather_object)."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return [item for part in gathered for item in part]


def rank_and_world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()
