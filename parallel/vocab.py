"""Per-token log-probabilities and entropies from vocab-parallel logits.

The output layer of a TP-sharded GPT gives each tensor-parallel rank the logits of its own
slice of the vocabulary. Policy-gradient losses need log pi(a_t) of the taken token and,
for an entropy bonus, H(pi) = log Z - sum_v p_v z_v, which both span the whole vocabulary.
Three all-reduces over the TP group assemble them (max, partition function, and the
picked logit / expected logit) without gathering the logits themselves. The sums go
through megatron's `reduce_from_tensor_model_parallel_region` (all-reduce forward, identity
backward): every TP rank computes the same loss from the totals, so the gradient of a
rank's partial sum is the gradient of the total.

Columns at or beyond `vocab_size` (the tokenizer's size; the model pads its vocabulary to a
multiple of 128 x TP) are left out, so the distribution is exactly the one the sampler in
trainer/generation.py draws from.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def _reduce(value: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return value
    return reduce_from_tensor_model_parallel_region(value, group)


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                         group: Optional[dist.ProcessGroup]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [b, s, V/tp] (this TP rank's vocabulary slice; rank r holds columns
    [r V/tp, (r+1) V/tp)), labels [b, s] global ids < vocab_size
    -> (log p(label) [b, s], entropy [b, s]), float32, differentiable w.r.t. the logits."""
    z = logits.float()
    width = z.shape[-1]
    rank = dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0
    start = rank * width
    columns = torch.arange(start, start + width, device=z.device)
    real = columns < vocab_size
    z = z.masked_fill(~real, float("-inf"))
    peak = z.detach().amax(-1)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    shifted = z - peak.unsqueeze(-1)  # <= 0; -inf on padding columns
    weights = torch.exp(shifted)  # 0 on padding columns
    total = _reduce(weights.sum(-1), group)
    log_total = torch.log(total)
    # sum_v e^{z_v - m} (z_v - m); the padding columns' 0 * -inf is replaced by 0.
    expected = _reduce(torch.where(real, weights * shifted.masked_fill(~real, 0.0), 0.0).sum(-1), group)
    local = labels - start
    mine = (local >= 0) & (local < width)
    picked = shifted.masked_fill(~real, 0.0).gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
    picked = _reduce(torch.where(mine, picked, torch.zeros_like(picked)), group)
    return picked - log_total, log_total - expected / total
