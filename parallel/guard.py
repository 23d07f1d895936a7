"""The non-finite guard: one world-wide check of loss and gradients before every update.

A NaN or Inf on one rank (a bad batch, an overflow, a flipped bit) would otherwise be applied
by the optimizer and spread to every replica through the next all-reduce; once checkpointed
it is the state a resume starts from. After the backward pass (and the data-parallel grad
reduction) each rank checks its own loss values and gradient buffers; one small all-reduce
over the whole job (every DP, TP and PP rank) tells every rank which ranks saw what, so all
of them skip the same update together (trainer/loop.py counts and stops). It costs one pass
over the local grad buffers (torch._foreach_norm, as the grad norm does) and one all-reduce
of 2 x world floats per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

VALUES = ("loss", "grad_norm")  # what is checked, in the order of the flag vector


@dataclass(frozen=True)
class NonFinite:
    """Which ranks saw a non-finite value, by value name (only names with a rank)."""

    ranks: dict[str, tuple[int, ...]]

    @property
    def first_rank(self) -> int:
        return min(rank for ranks in self.ranks.values() for rank in ranks)

    def describe(self) -> str:
        """e.g. "grad_norm on rank 1; loss on ranks 0,1"."""
        parts = []
        for name, ranks in self.ranks.items():
            plural = "s" if len(ranks) > 1 else ""
            parts.append(f"{name} on rank{plural} {','.join(str(r) for r in ranks)}")
        return "; ".join(parts)


def local_loss_bad(stored: list[dict[str, torch.Tensor]]) -> bool:
    """Whether this rank's loss (the [sum, count] pairs of its microbatches; only the last
    pipeline stage has them) holds a NaN or Inf."""
    values = [item["loss"].detach().float() for item in stored if "loss" in item]
    return bool(values) and not bool(torch.isfinite(torch.stack([v.sum() for v in values])).all())


def local_grads_bad(grads: Iterable[torch.Tensor]) -> bool:
    """Whether this rank's gradients hold a NaN or Inf: the norm of each tensor (one fused
    kernel) is non-finite exactly then."""
    tensors = [g for g in grads if g.numel() > 0]
    if not tensors:
        return False
    norms = torch._foreach_norm(tensors)
    return not bool(torch.isfinite(torch.stack(norms)).all())


def check_world(loss_bad: bool, grads_bad: bool) -> Optional[NonFinite]:
    """Collective over every rank of the job: None when all are finite, else who saw what.
    Every rank gets the same answer (and so skips the same update)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    flags = torch.zeros(len(VALUES), world, dtype=torch.float32)
    flags[0, rank], flags[1, rank] = float(loss_bad), float(grads_bad)
    if world > 1:
        if torch.cuda.is_available():  # NCCL reduces device tensors only
            flags = flags.cuda()
        dist.all_reduce(flags)
        flags = flags.cpu()
    ranks = {name: tuple(int(r) for r in torch.nonzero(flags[i]).flatten().tolist())
             for i, name in enumerate(VALUES)}
    ranks = {name: found for name, found in ranks.items() if found}
    return NonFinite(ranks) if ranks else None


def poison(grads: Iterable[torch.Tensor]) -> None:
    """Fault injection (train.fault.*): fill this rank's gradients with NaN."""
    for grad in grads:
        grad.fill_(float("nan"))
