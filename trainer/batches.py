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


def response_nll(batch: dict[str, torch.Tensor], model: torch.nn.Module,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of prompt + response (batch["tokens"] [n, S+1], the token-aligned
    batch["response_mask"]) -> (per-token -log p [n, S] of the labels under the LM, the
    response label mask [n, S]). Megatron's vocab-parallel cross entropy: any TP."""
    x = lm_inputs(batch["tokens"], device)
    per_token = model(x["input_ids"], x["position_ids"], x["attention_mask"], labels=x["labels"])
    # Label j is token j+1: it is scored iff token j+1 belongs to the response.
    return per_token, batch["response_mask"][:, 1:].to(device)


def packed_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A packed (or padded) chat batch -> model inputs. Positions restart at every
    conversation and the attention mask is block-diagonal causal, so no token attends
    across a conversation boundary (trainer/data/packing.py)."""
    from trainer.data.packing import packed_attention_mask

    tokens = batch["tokens"].to(device, non_blocking=True)
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "position_ids": batch["position_ids"].to(device),
            "attention_mask": packed_attention_mask(batch["segment_ids"].to(device))}


def pair_collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Preference pairs -> one microbatch of 2n rows, chosen and rejected interleaved
    (row 2i chosen, row 2i+1 rejected): one forward scores both. "tokens" comes first: the
    engine reads the microbatch size from the first tensor."""
    import numpy as np

    tokens = np.stack([s["tokens"] for s in samples])  # [n, 2, S+1]
    mask = np.stack([s["response_mask"] for s in samples])
    batch = {"tokens": torch.from_numpy(tokens.reshape(-1, tokens.shape[-1])),
             "response_mask": torch.from_numpy(mask.reshape(-1, mask.shape[-1]))}
    if "index" in samples[0]:
        batch["index"] = torch.tensor([int(s["index"]) for s in samples], dtype=torch.long)
    return batch


def split_rows(rows: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Cut aligned row tensors (first dimension n) into microbatches of `size` rows, keeping
    the key order (the engine reads the microbatch size from the first tensor). A short last
    chunk is filled up with copies of row 0 whose "response_mask" (if any) is zeroed: the
    pipeline's send/recv buffers need one microbatch size; callers drop the extra outputs."""
    n = next(iter(rows.values())).shape[0]
    chunks = []
    for start in range(0, n, size):
        chunk = {k: v[start:start + size] for k, v in rows.items()}
        short = size - next(iter(chunk.values())).shape[0]
        if short > 0:
            fill = {k: v[:1].expand(short, *v.shape[1:]) for k, v in rows.items()}
            if "response_mask" in fill:
                fill["response_mask"] = torch.zeros_like(fill["response_mask"])
            chunk = {k: torch.cat([chunk[k], fill[k]]) for k in rows}
        chunks.append(chunk)
    return chunks


def join_outputs(outputs: list[dict[str, torch.Tensor]], n: int) -> dict[str, torch.Tensor]:
    """Per-microbatch outputs of Engine.forward_outputs -> one tensor per key, first n rows."""
    return {k: torch.cat([o[k] for o in outputs])[:n] for k in outputs[0]}
