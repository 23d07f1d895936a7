"""TP x PP x DP process groups through megatron's parallel_state."""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from chatforge_config.parallel import ModelConfig, ParallelConfig, layout_problems


class LayoutError(ValueError):
    """A parallel layout that does not fit; the message names the config key and value."""


@dataclass(frozen=True)
class Topology:
    """This rank's place in the layout. Megatron keeps the groups in parallel_state; this
    object is what our code passes around instead of reading globals."""

    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return ps.get_data_parallel_group()

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return ps.get_tensor_model_parallel_group()

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return ps.get_pipeline_model_parallel_group()

    @property
    def last_stage_global_rank(self) -> int:
        return ps.get_pipeline_model_parallel_last_rank()


def check_layout(model: ModelConfig, parallel: ParallelConfig, world_size: int) -> None:
    problems = layout_problems(model, parallel, world_size)
    if problems:
        key, value, what = problems[0]
        raise LayoutError(f"{key}={value}: {what}")


def init_groups(model: ModelConfig, parallel: ParallelConfig, seed: int) -> Topology:
    """Validate, then build megatron's groups and seed its model-parallel RNG tracker."""
    world = dist.get_world_size()
    check_layout(model, parallel, world)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return Topology(
        world_size=world,
        rank=dist.get_rank(),
        tp=parallel.tp,
        pp=parallel.pp,
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def destroy_groups() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
