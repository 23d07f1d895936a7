"""Batched sampling from a (TP x PP) GPT engine: greedy, temperature, top-k, top-p.

Layout of a batch: prompts are LEFT-padded to the longest one, so that every row's next
token sits in the same slot and one decode step serves the whole batch. Pad slots are
masked out of attention (parallel/inference.py builds the masks) and each row's position
ids start at 0 at its first real token, so a prompt gives the same tokens alone or in any
batch (learned positions see the same ids; RoPE only sees position differences). Rows stop
individually on a stop id; a stopped row is fed `pad_id` until the whole batch is done.

Randomness: one `torch.Generator` on the host, seeded by `seed`, draws one uniform number
per row per step (also for rows that stopped, so the draws depend only on the seed, the
batch size and the step); the token is the inverse CDF of the filtered distribution at
that number. The draws never touch a device RNG, and the last stage's choice is broadcast
to every rank, so the result does not depend on the TP/PP layout. DP replicas use the seed
they are given: pass e.g. `seed + dp_rank` for independent streams.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch

from chatforge_config.trainer import SamplingConfig  # the schema of the `sampling` config group
from parallel.inference import IncrementalForward, real_vocab_size


def sampling_config(cfg: Any) -> SamplingConfig:
    """The run config's `sampling` group as the dataclass."""
    return SamplingConfig(**{f.name: cfg.sampling[f.name] for f in fields(SamplingConfig)})


def check_sampling(sampling: SamplingConfig) -> None:
    """Raise ValueError naming the first bad field (also for a Hydra DictConfig, which never
    runs a dataclass's __post_init__)."""
    problems = [
        ("max_new_tokens", sampling.max_new_tokens, sampling.max_new_tokens < 0, "must be >= 0"),
        ("temperature", sampling.temperature, sampling.temperature < 0, "must be >= 0 (0 is greedy)"),
        ("top_k", sampling.top_k, sampling.top_k < 0, "must be >= 0 (0 is off)"),
        ("top_p", sampling.top_p, not 0.0 < sampling.top_p <= 1.0, "must be in (0, 1] (1 is off)"),
    ]
    for name, value, bad, what in problems:
        if bad:
            raise ValueError(f"sampling.{name}={value}: {what}")


@dataclass
class Generation:
    # Generated ids per prompt (after the prompt), up to and including the stop id if hit.
    tokens: list[list[int]] = field(default_factory=list)
    # True where the row stopped on a stop id, False where it ran out of max_new_tokens.
    finished: list[bool] = field(default_factory=list)
    # log p(token) under the model's own distribution (temperature 1, no top-k/top-p).
    logprobs: list[list[float]] = field(default_factory=list)


# -- pure sampling functions --------------------------------------------------------------
def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [b, V] -> [b, V] float64 scaled by 1/temperature, -inf outside the top-k and
    outside the nucleus (the smallest set of most likely tokens whose mass reaches top_p;
    the most likely token always stays). Order as in HF transformers: temperature, k, p."""
    scores = logits.double() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # Drop a token when the mass before it already reaches top_p.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def sample_tokens(logits: torch.Tensor, sampling: SamplingConfig,
                  uniforms: Optional[torch.Tensor]) -> torch.Tensor:
    """logits [b, V], uniforms [b] in [0, 1) (None when greedy) -> token ids [b] long.
    Greedy (temperature 0) takes the first maximum; otherwise the inverse CDF of the
    filtered distribution at each row's uniform draw."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    assert uniforms is not None
    scores = filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
    target = uniforms.to(cdf.device, cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    # right=True: the first token whose cdf exceeds the target; zero-mass tokens are skipped.
    chosen = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return chosen.clamp_(max=logits.shape[-1] - 1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token]: logits [b, V], tokens [b] -> [b] float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.view(-1, 1)).squeeze(-1)


# -- the batch ----------------------------------------------------------------------------
def _check(engine: Any, prompts: list[list[int]], sampling: SamplingConfig) -> int:
    """-> the longest prompt; raises ValueError on an empty prompt or a batch too long for
    the learned position table."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError(f"generate: prompt {[len(p) for p in prompts].index(0)} is empty")
    longest = max(len(p) for p in prompts)
    seq_length = int(engine.model_cfg.seq_length)
    if longest + sampling.max_new_tokens > seq_length:
        raise ValueError(
            f"model.seq_length={seq_length}: too short for the longest prompt ({longest} "
            f"tokens) + sampling.max_new_tokens={sampling.max_new_tokens} = "
            f"{longest + sampling.max_new_tokens} tokens")
    return longest


def _left_padded(prompts: list[list[int]], length: int, pad_id: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> tokens [b, length] (prompts right-aligned in the first `longest` slots, pad_id
    elsewhere), positions [b, length] (0 at each row's first real token, 0 on pads) and
    padding [b, length] (True on the left pads)."""
    longest = max(len(p) for p in prompts)
    b = len(prompts)
    tokens = torch.full((b, length), pad_id, dtype=torch.long)
    offsets = torch.tensor([longest - len(p) for p in prompts], dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):longest] = torch.tensor(prompt, dtype=torch.long)
    slots = torch.arange(length).unsqueeze(0)
    padding = slots < offsets.unsqueeze(1)
    positions = (slots - offsets.unsqueeze(1)).clamp(min=0)
    return tokens.to(device), positions.to(device), padding.to(device)


def generate(engine: Any, prompts: list[list[int]], sampling: SamplingConfig, stop_ids: set[int],
             pad_id: int, seed: int, vocab_size: Optional[int] = None) -> Generation:
    """Continue every prompt by up to `sampling.max_new_tokens` tokens.

    Collective over the engine's model-parallel group (TP x PP): every rank of a DP replica
    passes the same prompts and gets the same Generation. `vocab_size`: the tokenizer's
    (the padded embedding rows are never sampled); default `engine.vocab_size` when the
    engine records it, else the model's padded vocabulary."""
    result = Generation([[] for _ in prompts], [False] * len(prompts), [[] for _ in prompts])
    check_sampling(sampling)
    if not prompts:
        return result
    longest = _check(engine, prompts, sampling)
    if sampling.max_new_tokens == 0:
        return result
    length = longest + sampling.max_new_tokens
    vocab = real_vocab_size(engine, vocab_size)
    runner = IncrementalForward(engine, len(prompts), length, vocab, use_cache=sampling.use_cache)
    tokens, positions, padding = _left_padded(prompts, length, pad_id, runner.device)
    rng = torch.Generator().manual_seed(seed) if engine.topo.is_last_stage else None
    with runner:
        for step in range(sampling.max_new_tokens):
            slot = longest + step
            logits = runner.next_logits(tokens[:, :slot], positions[:, :slot], padding[:, :slot])
            chosen = runner.share(_choose(logits, sampling, rng, len(prompts), runner.device))
            new_tokens = _record(result, chosen.cpu(), stop_ids)
            tokens[:, slot] = torch.tensor(
                [pad_id if done else tok for done, tok in new_tokens], device=runner.device)
            if all(result.finished):
                break
    return result


def _choose(logits: Optional[torch.Tensor], sampling: SamplingConfig,
            rng: Optional[torch.Generator], batch: int, device: torch.device) -> torch.Tensor:
    """-> [2, b] float64: the chosen tokens and their log-probs on the last stage; zeros
    (a placeholder for the broadcast) elsewhere."""
    if logits is None:
        return torch.zeros(2, batch, dtype=torch.float64, device=device)
    uniforms = None
    if sampling.temperature > 0:
        assert rng is not None
        uniforms = torch.rand(batch, generator=rng, dtype=torch.float64)
    chosen = sample_tokens(logits, sampling, uniforms)
    return torch.stack([chosen.double(), token_logprobs(logits, chosen).double()])


def _record(result: Generation, chosen: torch.Tensor, stop_ids: set[int]) -> list[tuple[bool, int]]:
    """Append this step's tokens to the rows still running; -> (row done, token) per row,
    where a row that stops on this step counts as running (its stop id is fed)."""
    fed: list[tuple[bool, int]] = []
    for row in range(chosen.shape[1]):
        token = int(chosen[0, row])
        if result.finished[row]:
            fed.append((True, token))
            continue
        result.tokens[row].append(token)
        result.logprobs[row].append(float(chosen[1, row]))
        result.finished[row] = token in stop_ids
        fed.append((False, token))
    return fed
