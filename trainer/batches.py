"""Turning token windows into the model's inputs."""
from __future__ import annotations

import torch


def causal_mask(seq_length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, s, s] bool, True where attention is *blocked* (Megatron's convention). Passed
    explicitly because megatron's default mask is allocated on CUDA."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device),
                      diagonal=1).view(1, 1, seq_length, seq_length)


def lm_inputs(tokens: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """tokens [b, s+1] -> inputs [b, s], labels [b, s] (shifted by one), positions, mask."""
    tokens = tokens.to(device, non_blocking=True)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    b, s = inputs.shape
    positions = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    return {"input_ids": inputs, "labels": labels, "position_ids": positions,
            "attention_mask": causal_mask(s, device)}
