"""Losses as pure tensor functions. Each returns what Megatron's pipeline schedule expects
from a loss function with `calculate_per_token_loss=True`: a summed loss, the number of
tokens (or samples) it sums over, and metrics as `[sum, count]` pairs that the engine
reduces over microbatches and data-parallel ranks."""
from __future__ import annotations

from typing import Optional

import torch

LossTerms = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def masked_token_loss(per_token_loss: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> LossTerms:
    """Next-token cross-entropy summed over the tokens the mask keeps.

    per_token_loss: [b, s] float, -log p(x_{t+1} | x_{<=t}) per position (Megatron's
        `compute_language_model_loss` output).
    loss_mask: [b, s] {0, 1}; None keeps every token (pretraining).
    Returns (sum_t m_t * l_t, sum_t m_t, {"loss": [sum, count]}): the schedule divides the
    global sum by the global count, so the loss is the token-weighted mean
    L = sum_t m_t l_t / sum_t m_t over the whole global batch.
    """
    losses = per_token_loss.float()
    if loss_mask is None:
        total = losses.sum()
        count = torch.tensor(losses.numel(), dtype=torch.int, device=losses.device)
    else:
        mask = loss_mask.to(losses.dtype)
        total = (losses * mask).sum()
        count = mask.sum().to(torch.int)
    pair = torch.stack([total.detach(), count.detach().to(total.dtype)])
    return total, count, {"loss": pair}
