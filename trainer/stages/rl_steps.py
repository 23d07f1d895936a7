"""The RL stages' Megatron forward_step functions: the actor's policy loss (clipped or plain,
with the loss options of every method) and the critic's value loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from trainer.batches import packed_inputs
from trainer.losses import (a2c_policy_loss, aggregate, kl_estimate, masked_token_loss, ppo_policy_loss,
                            value_loss)
from trainer.rollout import critic_forward, label_mask, policy_forward

Batch = dict[str, torch.Tensor]
POLICY_METRICS = ("policy_loss", "clip_fraction", "approx_kl", "entropy_bonus", "ptx_loss", "kl_loss")


@dataclass(frozen=True)
class PolicyLoss:
    """What the actor's loss is made of (from ppo.*; kl_beta is this iteration's beta when
    the KL is a loss term, else 0)."""

    clipped: bool  # PPO-style ratio clipping (every method but A2C)
    clip_low: float
    clip_high: float
    ratio_level: str
    agg: str
    max_len: int  # Dr. GRPO's constant normaliser: sampling.max_new_tokens
    kl_beta: float
    kl_estimator: str
    entropy_coef: float
    ptx_coef: float

    @classmethod
    def of(cls, cfg: Any, clipped: bool, beta: float) -> "PolicyLoss":
        ppo = cfg.ppo
        low = float(ppo.clip if ppo.clip_low is None else ppo.clip_low)
        high = float(ppo.clip if ppo.clip_high is None else ppo.clip_high)
        return cls(clipped, low, high, str(ppo.ratio_level), str(ppo.loss_agg), int(cfg.sampling.max_new_tokens),
                   beta if str(ppo.kl_in) == "loss" else 0.0, str(ppo.kl_estimator), float(ppo.entropy_coef),
                   float(ppo.ptx_coef))

    def count(self, mask: torch.Tensor) -> float:
        """What the loss of rows with this label mask is divided by (tokens or responses)."""
        return float(aggregate(torch.zeros_like(mask, dtype=torch.float32), mask, self.agg, self.max_len)[1])


def _zero() -> torch.Tensor:
    return torch.zeros(2, dtype=torch.float32)


def _ptx_step(batch: Batch, model: torch.nn.Module, device: torch.device, loss: PolicyLoss) -> Any:
    """A PPO-ptx microbatch (SFT rows, with "ptx_scale" = (policy loss count) / (ptx tokens)
    of the minibatch): ptx_coef x its token loss at that scale, counting nothing, so the
    step minimises mean policy loss + ptx_coef x mean SFT loss."""
    x = packed_inputs(batch, device)
    per_token = model(x["input_ids"], x["position_ids"], x["attention_mask"], labels=x["labels"])
    mask = batch["loss_mask"].to(device)
    scale = float(batch["ptx_scale"][0]) * loss.ptx_coef

    def ptx_loss(output: torch.Tensor) -> Any:
        total, _, metrics = masked_token_loss(output, mask)
        found = {name: _zero().to(total.device) for name in POLICY_METRICS}
        found["ptx_loss"] = metrics["loss"]
        return total * scale, torch.zeros((), dtype=torch.int, device=total.device), found
    return per_token, ptx_loss


def actor_step(batch: Batch, model: torch.nn.Module, device: torch.device, vocab_size: int, tp_group: Any,
               loss: PolicyLoss) -> Any:
    """Megatron forward_step of the actor. A rollout microbatch gives the clipped (or A2C)
    policy loss, plus kl_beta x the KL estimate to the reference (GRPO's loss term), minus
    entropy_coef x the entropy, each aggregated by ppo.loss_agg; a PPO-ptx microbatch adds
    the SFT loss (_ptx_step)."""
    if "loss_mask" in batch:
        return _ptx_step(batch, model, device, loss)
    logits, to_logp = policy_forward(batch, model, device, vocab_size, tp_group)
    mask = label_mask(batch, device).float()
    advantages = batch["advantages"].to(device)

    def loss_fn(output: torch.Tensor) -> Any:
        logp, entropy = to_logp(output)
        if loss.clipped:
            total, count, metrics = ppo_policy_loss(logp, batch["old_logp"].to(device), advantages, mask,
                                                    loss.clip_low, loss.clip_high, loss.ratio_level, loss.agg,
                                                    loss.max_len)
        else:
            total, count, metrics = a2c_policy_loss(logp, advantages, mask, loss.agg, loss.max_len)
        found = {name: _zero().to(total.device) for name in POLICY_METRICS}
        found.update({k: v for k, v in metrics.items() if k != "loss"})
        found["policy_loss"] = metrics["loss"]
        bonus, _ = aggregate(entropy, mask, loss.agg, loss.max_len)
        found["entropy_bonus"] = torch.stack([bonus.detach(), count.detach().to(bonus.dtype)])
        if loss.kl_beta > 0:
            kl, _ = aggregate(kl_estimate(logp, batch["ref_logp"].to(device), loss.kl_estimator), mask, loss.agg,
                              loss.max_len)
            found["kl_loss"] = torch.stack([kl.detach(), count.detach().to(kl.dtype)])
            total = total + loss.kl_beta * kl
        return total - loss.entropy_coef * bonus, count, found

    return logits, loss_fn


def critic_step(batch: Batch, model: torch.nn.Module, device: torch.device, clip: Optional[float]) -> Any:
    """Megatron forward_step of the critic: the (clipped) value loss over response tokens."""
    values = critic_forward(batch, model, device)
    mask = label_mask(batch, device).float()

    def loss_fn(output: torch.Tensor) -> Any:
        total, count, metrics = value_loss(output.squeeze(-1).float(), batch["old_values"].to(device),
                                           batch["returns"].to(device), mask, clip)
        return total, count, {"value_loss": metrics["loss"]}

    return values, loss_fn
