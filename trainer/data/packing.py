"""Fixed-length SFT samples: fit conversations to seq_length, then pack or pad them.

Layout of one row (N rows, s = seq_length):

    tokens       int64   [N, s+1]  the samples of the row back to back, then pad_id
    loss_mask    float32 [N, s]    aligned to labels = tokens[:, 1:]: loss_mask[j] = 1 iff
                                   tokens[j+1] is a target AND tokens[j], tokens[j+1] belong
                                   to the same sample (nothing is predicted across samples)
    position_ids int64   [N, s]    0, 1, 2 ... restarting at every sample (0 on padding)
    segment_ids  int32   [N, s]    1, 2, 3 ... per sample in the row, 0 on padding

Capacity rule: a row holds samples of total length <= s, so every sample token is an input
(inside the [N, s] input window) and gets a position and a segment id; tokens[:, s] is
always padding. Samples are therefore fitted to at most s tokens first (fit_samples).
The attention mask for packed rows comes from segment_ids (packed_attention_mask).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from trainer.data.chat import truncate_masked

OVERLONG: tuple[str, ...] = ("truncate", "drop")


@dataclass
class ChatSample:
    """One tokenized conversation: ids [T] and its target mask [T] (1 = train on this token)."""

    ids: list[int]
    mask: list[int]


def _has_target(mask: Sequence[int]) -> bool:
    # mask[0] can never be a label (nothing precedes it), so it does not count.
    return any(mask[1:])


def fit_samples(samples: Sequence[ChatSample], seq_length: int,
                overlong: str) -> tuple[list[ChatSample], dict[str, int]]:
    """Samples of at most `seq_length` tokens, and counts {"kept", "truncated", "dropped"}.

    A longer sample is cut by chat.truncate_masked (keep the end of the conversation before
    the final reply and the start of that reply) with overlong="truncate", or dropped with
    overlong="drop". A sample left without any target token is dropped. kept + dropped ==
    len(samples); truncated counts the kept samples that were cut.
    """
    if overlong not in OVERLONG:
        raise ValueError(f"data.overlong={overlong!r} must be one of {OVERLONG}")
    if seq_length < 2:
        raise ValueError(f"seq_length={seq_length} must be at least 2")
    out: list[ChatSample] = []
    counts = {"kept": 0, "truncated": 0, "dropped": 0}
    for s in samples:
        if len(s.ids) != len(s.mask):
            raise ValueError(f"sample ids and mask differ in length: {len(s.ids)} != {len(s.mask)}")
        cut = len(s.ids) > seq_length
        if cut and overlong == "drop":
            counts["dropped"] += 1
            continue
        ids, mask = truncate_masked(s.ids, s.mask, seq_length) if cut else (list(s.ids), list(s.mask))
        if not _has_target(mask):
            counts["dropped"] += 1
            continue
        out.append(ChatSample(ids, mask))
        counts["kept"] += 1
        counts["truncated"] += int(cut)
    return out, counts


class _FirstFit:
    """Bins of equal capacity; add(size) puts an item into the FIRST bin with room.

    A max segment tree over the bins' free space finds that bin in O(log n) instead of a scan
    over all open bins (n samples can mean n bins).
    """

    def __init__(self, max_bins: int, capacity: int) -> None:
        self.size = 1 << max(0, max_bins - 1).bit_length()
        self.capacity = capacity
        self.free = [capacity] * (2 * self.size)  # unopened bins are empty bins
        self.bins: list[list[int]] = []

    def add(self, item: int, size: int) -> None:
        node = 1
        while node < self.size:  # descend to the leftmost leaf with free >= size
            node = 2 * node if self.free[2 * node] >= size else 2 * node + 1
        b = node - self.size
        if b == len(self.bins):
            self.bins.append([])
        self.bins[b].append(item)
        self.free[node] -= size
        node //= 2
        while node:
            self.free[node] = max(self.free[2 * node], self.free[2 * node + 1])
            node //= 2


def pack(samples: Sequence[ChatSample], seq_length: int, seed: int) -> list[list[int]]:
    """Indices of the samples in each row: a seeded shuffle, then greedy first-fit.

    Every row's total length is <= seq_length (see the module doc). The same (samples,
    seq_length, seed) always gives the same rows.
    """
    order = np.random.default_rng(seed).permutation(len(samples))
    fit = _FirstFit(len(samples), seq_length)
    for i in order.tolist():
        n = len(samples[i].ids)
        if not 0 < n <= seq_length:
            raise ValueError(f"sample {i} has {n} tokens; fit_samples first (seq_length={seq_length})")
        fit.add(i, n)
    return fit.bins


def build_packed(samples: Sequence[ChatSample], packs: Sequence[Sequence[int]], seq_length: int,
                 pad_id: int) -> dict[str, np.ndarray]:
    """The arrays of the module doc, one row per pack (pack = sample indices, in row order)."""
    n = len(packs)
    tokens = np.full((n, seq_length + 1), pad_id, dtype=np.int64)
    loss_mask = np.zeros((n, seq_length), dtype=np.float32)
    position_ids = np.zeros((n, seq_length), dtype=np.int64)
    segment_ids = np.zeros((n, seq_length), dtype=np.int32)
    for row, pack_ in enumerate(packs):
        offset = 0
        for seg, i in enumerate(pack_, 1):
            ids, mask = samples[i].ids, samples[i].mask
            end = offset + len(ids)
            if end > seq_length:
                raise ValueError(f"pack {row} holds {end} > seq_length={seq_length} tokens")
            tokens[row, offset:end] = ids
            # Label of input j is token j+1: the sample's mask shifted left by one, so its
            # last input (whose label is the next sample's first token) gets no loss.
            loss_mask[row, offset:end - 1] = mask[1:]
            position_ids[row, offset:end] = np.arange(len(ids))
            segment_ids[row, offset:end] = seg
            offset = end
    return {"tokens": tokens, "loss_mask": loss_mask, "position_ids": position_ids,
            "segment_ids": segment_ids}


def build_padded(samples: Sequence[ChatSample], seq_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """build_packed with one sample per row (data.packing=false): same arrays, more padding."""
    return build_packed(samples, [[i] for i in range(len(samples))], seq_length, pad_id)


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids [b, s] -> attention mask [b, 1, s, s] bool, True where attention is BLOCKED
    (Megatron's convention).

    Query i may attend key j iff j <= i and both are in the same sample (same nonzero segment):
    block-diagonal causal. A padding query attends only to itself, so no softmax row is empty
    (an all-blocked row would give NaN); its loss is masked anyway.
    """
    s = segment_ids.shape[-1]
    q = segment_ids.unsqueeze(-1)  # [b, s, 1]
    k = segment_ids.unsqueeze(-2)  # [b, 1, s]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (q == k) & (q != 0) & causal
    allowed |= torch.eye(s, dtype=torch.bool, device=segment_ids.device)
    return (~allowed).unsqueeze(1)
