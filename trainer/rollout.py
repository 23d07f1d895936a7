"""Rollouts of the RL stages: prompts -> responses -> log-probs, values, rewards (advantages:
trainer/advantages.py).

Layout of a rollout on one data-parallel rank (n responses): a row is prompt + response,
right-padded to S+1 tokens (chat_prepare.response_row), so plain causal attention with
positions 0.. applies and the padding never influences a response token. S is the longest
row of the rollout, not model.seq_length: the forwards and updates skip the padding
columns no row needs (tools/bench/ppo_iteration.py measured rows only 14-59% full at
model.seq_length). Every per-token tensor is [n, S] and aligned with the model's labels:
column j is the action "token j+1" taken in the state "tokens 0..j". `mask` [n, S] is 1
on the response's tokens (one contiguous run per row, the stop token included).

Groups: with ppo.n_samples_per_prompt = G, a rank's rows are its prompts each repeated G
times, consecutively (rows g*G .. g*G+G-1 answer prompt g), so a group never spans ranks.

The models are parallel.Engine objects at this run's TP/PP layout: the actor (the policy, LM
head), the reference (frozen copy of the SFT policy; None when no KL is used), the critic
(scalar head, trainable; None for the critic-free estimators). Rewards come from the stage
(trainer/rewards.py: reward models, verifiers, rules, user callables).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from chatforge_config.trainer import SamplingConfig
from parallel.engine import Engine, all_reduce_host
from parallel.vocab import logprobs_and_entropy
from trainer.batches import join_outputs, lm_inputs, split_rows
from trainer.data.chat_prepare import longest_row, response_rows
from trainer.data.tokenizer import Tokenizer
from trainer.generation import generate
from trainer.losses import outputs_only
from trainer.rewards import group_spread

Batch = dict[str, torch.Tensor]


# ---- what a rollout needs besides the models ---------------------------------------------

@dataclass
class PromptSampler:
    """Prompt indices in a fresh seeded permutation each epoch over `count` prompts; the
    whole state is how many were taken (Megatron's consumed samples)."""

    count: int
    seed: int
    consumed: int = 0

    def take(self, n: int) -> list[int]:
        out = []
        for k in range(self.consumed, self.consumed + n):
            epoch, offset = divmod(k, self.count)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.count)
            out.append(int(order[offset]))
        self.consumed += n
        return out

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])


@dataclass
class KLController:
    """The KL penalty coefficient beta. Fixed when `target` is 0; otherwise the adaptive
    controller of Ziegler et al. 2019 (sec. 2.2): with e = clip(KL / target - 1, -0.2, 0.2),
    beta <- beta (1 + e n / horizon) after a rollout of n responses whose mean sequence
    KL to the reference is KL."""

    beta: float
    target: float = 0.0
    horizon: int = 10000

    def update(self, kl: float, n: int) -> None:
        if self.target <= 0:
            return
        error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
        self.beta *= 1.0 + error * n / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])


@dataclass
class Rollout:
    """One data-parallel rank's share of a rollout batch."""

    prompt_index: list[int]
    prompts: list[list[int]]
    responses: list[list[int]]
    finished: list[bool]
    tokens: torch.Tensor  # [n, S+1] long
    response_mask: torch.Tensor  # [n, S+1] token-aligned (what the reward model reads)
    mask: torch.Tensor  # [n, S] label-aligned
    score: torch.Tensor  # [n] reward (the weighted sources, minus the missing-EOS penalty)
    logp: torch.Tensor  # [n, S] log pi_old of the taken tokens
    ref_logp: torch.Tensor  # [n, S] (= logp when there is no reference model)
    entropy: torch.Tensor  # [n, S] of pi_old
    values: torch.Tensor  # [n, S] critic V(s_t) (0 without a critic)
    group_size: int = 1
    sources: dict[str, torch.Tensor] = field(default_factory=dict)  # reward_<key>: [n] raw scores
    # [n] the reward before ppo.reward_norm / reward_clip (what is logged as "reward"); empty: score
    raw_score: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    has_critic: bool = True
    # [n] 1.0 where the response takes part in the loss (0: an overlong response, ppo.overlong_mask)
    loss_rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    rewards: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [n, S]
    advantages: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [n, S]
    returns: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [n, S]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def seq_length(self) -> int:
        """S: the model input length of this rollout's rows."""
        return int(self.tokens.shape[1]) - 1

    def rows(self, index: Optional[np.ndarray] = None) -> Batch:
        """What the update's step functions read, for the rows in `index` (default all);
        "tokens" first (the engine reads the microbatch size from it)."""
        loss_rows = self.loss_rows if self.loss_rows.numel() else torch.ones(len(self.responses))
        fields = {"tokens": self.tokens, "response_mask": self.response_mask, "old_logp": self.logp,
                  "ref_logp": self.ref_logp, "old_values": self.values, "advantages": self.advantages,
                  "returns": self.returns, "loss_rows": loss_rows}
        if index is None:
            return dict(fields)
        picked = torch.from_numpy(np.asarray(index, dtype=np.int64))
        return {k: v[picked] for k, v in fields.items()}


# ---- forward passes (Megatron forward_step functions) --------------------------------------

def label_mask(batch: Batch, device: torch.device) -> torch.Tensor:
    """[n, S] 1 where the label (token j+1) belongs to a response that takes part in the loss."""
    mask = batch["response_mask"][:, 1:].to(device)
    if "loss_rows" in batch:
        mask = mask * batch["loss_rows"].to(device, mask.dtype).unsqueeze(-1)
    return mask


def policy_forward(batch: Batch, model: torch.nn.Module, device: torch.device, vocab_size: int,
                   tp_group: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """The policy's logits and a function logits -> (log pi of the labels [n, S], entropy
    [n, S]) over the tokenizer's vocabulary (parallel.vocab)."""
    x = lm_inputs(batch["tokens"], device)
    logits = model(x["input_ids"], x["position_ids"], x["attention_mask"])
    return logits, lambda output: logprobs_and_entropy(output, x["labels"], vocab_size, tp_group)


def critic_forward(batch: Batch, model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """Scalar-head values [n, S] (V of the state at each input position)."""
    x = lm_inputs(batch["tokens"], device)
    return model(x["input_ids"], x["position_ids"], x["attention_mask"])


def forward_rows(engine: Engine, rows: Batch, micro_batch: int, step: Callable[[Batch, torch.nn.Module], Any],
                 seq_length: int) -> Batch:
    """Forward-only outputs for every row, `micro_batch` rows per microbatch."""
    n = rows["tokens"].shape[0]
    outputs = engine.forward_outputs(split_rows(rows, micro_batch), step, seq_length=seq_length)
    return join_outputs(outputs, n)


def sample_responses(engine: Engine, tok: Tokenizer, prompts: list[list[int]], sampling: SamplingConfig,
                     seed: int, offset: int = 0) -> tuple[list[list[int]], list[bool]]:
    """(responses, finished) to `prompts`, sampling.batch prompts per generate call; the
    seed of each call derives from `seed` and the call's first row counted from `offset`
    (this rank's first row in the whole rollout), so the same prompts and seed give the same
    draws whatever model samples them, and a rank of a DP layout draws what one process
    drawing every row would (when sampling.batch divides the rows per rank)."""
    responses: list[list[int]] = []
    finished: list[bool] = []
    per_call = max(int(sampling.batch), 1)
    for k in range(0, len(prompts), per_call):
        call_seed = int(np.random.SeedSequence([seed, offset + k]).generate_state(1)[0])
        gen = generate(engine, prompts[k:k + per_call], sampling, stop_ids={tok.end_of_turn_id, tok.eod_id},
                       pad_id=tok.pad_id, seed=call_seed)
        responses += gen.tokens
        finished += gen.finished
    return responses, finished


def policy_logprobs(ctx: Any, engine: Engine, rows: Batch, vocab_size: int, micro_batch: int) -> Batch:
    """{"logp", "entropy"} [n, S] of a policy over rows (response_row's tokens [n, S+1])."""
    seq = rows["tokens"].shape[1] - 1
    device, group = ctx.device, ctx.topo.tp_group

    def step(batch: Batch, model: torch.nn.Module) -> Any:
        logits, to_logp = policy_forward(batch, model, device, vocab_size, group)

        def loss_fn(output: torch.Tensor) -> Any:
            logp, entropy = to_logp(output)
            return outputs_only(output, logp=logp, entropy=entropy)
        return logits, loss_fn

    return forward_rows(engine, rows, micro_batch, step, seq)


# ---- making a rollout ------------------------------------------------------------------------

Rewards = tuple[torch.Tensor, dict[str, torch.Tensor]]  # (reward [n], raw score per source)


class RolloutMaker:
    """Generation with the actor, then one forward of each model over the responses."""

    def __init__(self, ctx: Any, tok: Tokenizer, actor: Engine, reference: Optional[Engine],
                 critic: Optional[Engine], sampling: SamplingConfig, full_rows: bool = False) -> None:
        self.ctx, self.tok, self.sampling = ctx, tok, sampling
        self.actor, self.reference, self.critic = actor, reference, critic
        self.seq = int(ctx.cfg.model.seq_length)
        # Rows padded to model.seq_length, not to the rollout's longest: where SFT rows
        # (PPO-ptx) share the actor's pipeline microbatches, whose p2p buffers have one shape.
        self.full_rows = full_rows
        self.micro = int(ctx.cfg.train.micro_batch)
        self.stops = {tok.end_of_turn_id, tok.eod_id}

    def sample(self, prompts: list[list[int]], seed: int, offset: int = 0) -> tuple[list[list[int]], list[bool]]:
        return sample_responses(self.actor, self.tok, prompts, self.sampling, seed, offset)

    def policy_logprobs(self, engine: Engine, rows: Batch) -> Batch:
        return policy_logprobs(self.ctx, engine, rows, self.tok.vocab_size, self.micro)

    def values(self, rows: Batch) -> torch.Tensor:
        device = self.ctx.device
        if self.critic is None:
            return torch.zeros(rows["tokens"].shape[0], rows["tokens"].shape[1] - 1)

        def step(batch: Batch, model: torch.nn.Module) -> Any:
            values = critic_forward(batch, model, device)
            return values, lambda output: outputs_only(output, values=output.squeeze(-1).float())

        return forward_rows(self.critic, rows, self.micro, step, rows["tokens"].shape[1] - 1)["values"]

    def make(self, prompts: list[list[int]], seed: int, reward: Callable[[list[list[int]], list[bool]], Rewards],
             missing_eos_penalty: float = 0.0, offset: int = 0, group_size: int = 1) -> Rollout:
        """Sample (`prompts` already repeated group_size times) and score; no advantages yet
        (trainer/advantages.py). `reward(responses, finished)` scores the responses."""
        started = time.perf_counter()
        responses, finished = self.sample(prompts, seed, offset)
        generated = time.perf_counter()
        scores = reward(responses, finished)
        rewarded = time.perf_counter()
        rollout = self.score(prompts, responses, finished, scores, missing_eos_penalty)
        rollout.group_size = group_size
        rollout.seconds = {"generation_s": generated - started, "reward_s": rewarded - generated,
                           "forward_s": time.perf_counter() - rewarded}
        return rollout

    def score(self, prompts: list[list[int]], responses: list[list[int]], finished: list[bool],
              rewards: Rewards, missing_eos_penalty: float = 0.0) -> Rollout:
        """One forward of the actor, the reference and the critic over the responses (those
        that exist), with their rewards."""
        seq = self.seq if self.full_rows else longest_row(prompts, responses, self.seq)
        rows = response_rows(prompts, responses, seq, self.tok.pad_id)
        actor = self.policy_logprobs(self.actor, rows)
        ref_logp = actor["logp"] if self.reference is None else self.policy_logprobs(self.reference, rows)["logp"]
        values = self.values(rows)
        score = rewards[0].float() - missing_eos_penalty * (1.0 - torch.tensor(finished, dtype=torch.float32))
        mask = rows["response_mask"][:, 1:].float()
        return Rollout([], prompts, responses, finished, rows["tokens"], rows["response_mask"], mask, score,
                       actor["logp"] * mask, ref_logp * mask, actor["entropy"] * mask, values * mask,
                       sources=rewards[1], has_critic=self.critic is not None)


def dp_sum(values: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum a small float64 host tensor over the data-parallel ranks."""
    return values if group is None else all_reduce_host(values, group)


def rollout_metrics(r: Rollout, dp_group: Any, gold: Optional[list[float]] = None) -> dict[str, float]:
    """Means over the whole rollout (all DP ranks): reward (the weighted sources before
    normalisation and clipping; the penalty for a missing EOS included), kl (per sequence,
    sum_t log pi - log pi_ref), entropy (per token), response_length, finished, the raw
    score of every reward source (reward_<key>), and the gold reward where the data has
    one. With a critic: value, return, explained_variance = 1 - Var(R - V) / Var(R) over
    response tokens. Once advantages exist: advantage_mean / advantage_std / advantage_abs
    (per response token) and, for groups (n_samples_per_prompt > 1), flat_groups: the share
    of groups whose rewards are all equal (no signal for a group estimator)."""
    mask = r.mask.double()
    n = float(len(r.responses))
    returns = r.returns if r.returns.numel() else r.values  # no advantages yet (evaluation)
    err = (returns - r.values).double() * mask
    ret = returns.double() * mask
    adv = (r.advantages.double() * mask) if r.advantages.numel() else torch.zeros_like(mask)
    groups = len(r.responses) // r.group_size
    flat = float((~group_spread(r.score, r.group_size)).sum()) if r.group_size > 1 else 0.0
    keys = sorted(r.sources)
    raw = r.raw_score if r.raw_score.numel() else r.score
    sums = torch.tensor([
        n, float(raw.double().sum()), float(((r.logp - r.ref_logp).double() * mask).sum()),
        float(mask.sum()), float((r.entropy.double() * mask).sum()), float(sum(r.finished)),
        float((r.values.double() * mask).sum()), float(ret.sum()), float((ret * ret).sum()),
        float(err.sum()), float((err * err).sum()), float(sum(gold) if gold else 0.0),
        float(adv.sum()), float((adv * adv).sum()), float(adv.abs().sum()), flat, float(groups),
        *[float(r.sources[k].double().sum()) for k in keys],
    ], dtype=torch.float64)
    s = dp_sum(sums, dp_group).tolist()
    count, tokens = max(s[0], 1.0), max(s[3], 1.0)
    var_ret = s[8] / tokens - (s[7] / tokens) ** 2
    var_err = s[10] / tokens - (s[9] / tokens) ** 2
    out = {"reward": s[1] / count, "kl": s[2] / count, "response_length": s[3] / count,
           "entropy": s[4] / tokens, "finished": s[5] / count}
    out.update({k: s[17 + i] / count for i, k in enumerate(keys)})
    if r.has_critic:
        out["value"] = s[6] / tokens
        if r.returns.numel():
            out["return"] = s[7] / tokens
            out["explained_variance"] = 1.0 - var_err / var_ret if var_ret > 1e-12 else float("nan")
    if r.advantages.numel():
        out["advantage_mean"] = s[12] / tokens
        out["advantage_std"] = max(s[13] / tokens - (s[12] / tokens) ** 2, 0.0) ** 0.5
        out["advantage_abs"] = s[14] / tokens
        if r.group_size > 1:
            out["flat_groups"] = s[15] / max(s[16], 1.0)
    if gold is not None:
        out["gold_reward"] = s[11] / count
    return out
