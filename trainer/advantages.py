"""Advantage estimators of the RL pipeline, looked up by name (ppo.advantage_estimator).

Each takes a scored rollout (trainer/rollout.py: the reward `score` [n] of every response, the
policy and reference log-probs [n, S], the critic's values where there is a critic) and sets
its per-token `advantages` and `returns` [n, S] (0 off the response). The formulas are the pure
functions of trainer/losses.py; this module only says which applies, where the KL penalty
goes and over which responses statistics are taken: a group (the n_samples_per_prompt
responses of one prompt, always on one data-parallel rank) or the whole rollout (moments
summed over the data-parallel ranks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from chatforge_config.trainer import ADVANTAGE_ESTIMATORS
from trainer.losses import (gae, group_advantages, group_centered, kl_estimate, kl_penalty_rewards, masked_moments,
                            whiten)


@dataclass
class AdvantageSettings:
    estimator: str
    beta: float  # the KL coefficient of this rollout
    kl_in_reward: bool  # False: the KL is a loss term (or off); the reward is the score alone
    kl_estimator: str
    gamma: float
    lam: float
    whiten: bool  # gae only (the REINFORCE++ estimators always whiten; group ones never)
    group_size: int


DpSum = Callable[[torch.Tensor], torch.Tensor]


def _kl_beta(s: AdvantageSettings) -> float:
    return s.beta if s.kl_in_reward else 0.0


def _gae(r: Any, s: AdvantageSettings, dp_sum: DpSum) -> None:
    """PPO / A2C: per-token KL-penalised rewards, GAE(gamma, lambda) against the critic;
    advantages whitened over the rollout (ppo.whiten_advantages)."""
    r.rewards = kl_penalty_rewards(r.score, r.logp, r.ref_logp, r.mask, _kl_beta(s), s.kl_estimator)
    advantages, r.returns = gae(r.rewards, r.values, r.mask, s.gamma, s.lam)
    if s.whiten:
        advantages = whiten(advantages, r.mask, moments=dp_sum(masked_moments(advantages, r.mask)))
    r.advantages = advantages


def _group(r: Any, s: AdvantageSettings, dp_sum: DpSum) -> None:
    """GRPO, Dr. GRPO, RLOO: one advantage per response from its group's rewards (with
    KL in the reward, each reward is score - beta x the sequence's summed KL estimate),
    given to every token of the response."""
    seq_kl = (kl_estimate(r.logp, r.ref_logp, s.kl_estimator) * r.mask).sum(-1)
    total = r.score - _kl_beta(s) * seq_kl
    per_sequence = group_advantages(total, s.group_size, s.estimator)
    r.rewards = kl_penalty_rewards(r.score, r.logp, r.ref_logp, r.mask, _kl_beta(s), s.kl_estimator)
    r.advantages = per_sequence.unsqueeze(-1) * r.mask
    r.returns = r.advantages


def _reinforce_pp(r: Any, s: AdvantageSettings, dp_sum: DpSum) -> None:
    """REINFORCE++ (Hu 2025, sec. 3): per-token rewards with the KL penalty folded in (the
    score, group-centred for the _baseline variant, at the last token), returns-to-go
    G_t = sum_{l>=0} gamma^l r_{t+l} (GAE with V = 0 and lambda = 1), whitened over the whole
    rollout (global batch normalisation instead of a critic)."""
    score = group_centered(r.score, s.group_size) if s.estimator == "reinforce_pp_baseline" else r.score
    r.rewards = kl_penalty_rewards(score, r.logp, r.ref_logp, r.mask, _kl_beta(s), s.kl_estimator)
    returns, _ = gae(r.rewards, torch.zeros_like(r.rewards), r.mask, s.gamma, 1.0)
    r.returns = returns
    r.advantages = whiten(returns, r.mask, moments=dp_sum(masked_moments(returns, r.mask)))


ESTIMATORS: dict[str, Callable[[Any, AdvantageSettings, DpSum], None]] = {
    "gae": _gae,
    "grpo": _group,
    "dr_grpo": _group,
    "rloo": _group,
    "reinforce_pp": _reinforce_pp,
    "reinforce_pp_baseline": _reinforce_pp,
}
assert tuple(ESTIMATORS) == ADVANTAGE_ESTIMATORS, "one name list: chatforge_config/trainer.py"


def add_advantages(rollout: Any, settings: AdvantageSettings, dp_sum: DpSum) -> None:
    """Set rollout.rewards, .advantages and .returns with the named estimator."""
    if settings.estimator not in ESTIMATORS:
        raise ValueError(f"ppo.advantage_estimator={settings.estimator!r}: one of {', '.join(ESTIMATORS)}")
    ESTIMATORS[settings.estimator](rollout, settings, dp_sum)
