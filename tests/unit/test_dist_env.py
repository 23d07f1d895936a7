"""Distributed start-up reads torchrun's or SLURM's environment, or runs alone."""
from __future__ import annotations

import pytest

from parallel.dist import env_from, first_slurm_host


@pytest.mark.parametrize("nodelist, host", [
    ("node1", "node1"),
    ("gpu[003-005,9]", "gpu003"),
    ("gpu[12,14],cpu1", "gpu12"),
    ("a-b-c[7]", "a-b-c7"),
    ("n1,n2", "n1"),
])
def test_first_slurm_host(nodelist: str, host: str) -> None:
    assert first_slurm_host(nodelist) == host


def test_single_process_without_environment() -> None:
    env = env_from({})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")


def test_torchrun_variables() -> None:
    env = env_from({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                    "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port,
            env.source) == (3, 4, 1, "10.0.0.2", 1234, "torchrun")


def test_slurm_variables_master_from_first_node() -> None:
    env = env_from({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                    "SLURM_JOB_NODELIST": "gpu[002-003]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.source) == (
        5, 8, 1, "gpu002", "slurm")
    # Derived from the job id so two jobs on one node do not collide.
    assert env.master_port == 20000 + 4242


def test_torchrun_wins_inside_srun() -> None:
    env = env_from({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "RANK": "1", "WORLD_SIZE": "2"})
    assert (env.rank, env.source) == (1, "torchrun")
