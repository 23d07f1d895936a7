"""RLHF's pure functions against hand-computed values, with masks for finished responses of
different lengths (trainer/losses.py)."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import (a2c_policy_loss, gae, kl_penalty_rewards, ppo_policy_loss, value_loss,
                            whiten)


def _close(actual: torch.Tensor, expected: list[list[float]]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def _mean(metrics: dict[str, torch.Tensor], name: str) -> float:
    total, count = metrics[name].tolist()
    return total / count


def test_kl_penalty_rewards_put_the_score_on_each_rows_last_token() -> None:
    score = torch.tensor([3.0, 1.0])
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards = kl_penalty_rewards(score, logp, ref, mask, beta=0.1)
    _close(rewards, [[-0.05, 3.0, 0.0], [0.0, -0.1, 1.0]])


def test_gae_and_returns_with_a_finished_row() -> None:
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 0.2, 9.0], [1.0, 1.0, 1.0]])  # 9.0 lies past row 0's end
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    _close(adv, [[0.256, 0.8, 0.0], [0.3464, 0.62, 1.0]])
    _close(ret, [[0.756, 1.0, 0.0], [1.3464, 1.62, 2.0]])
    # gamma = lam = 1 and zero values: the advantage is the reward still to come.
    adv1, _ = gae(rewards, torch.zeros_like(values), mask, gamma=1.0, lam=1.0)
    _close(adv1, [[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]])


def test_whiten_uses_masked_entries_only() -> None:
    out = whiten(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1, 1, 0]]))
    _close(out, [[-1.0, 1.0, 0.0]])
    kept = whiten(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1, 1, 0]]), shift_mean=False)
    _close(kept, [[0.5, 2.5, 0.0]])


def test_ppo_clipped_surrogate() -> None:
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    total, count, metrics = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    assert total.item() == pytest.approx(-1.7)  # -1.2 (clipped) + -0.5 (unclipped)
    assert int(count) == 2
    assert _mean(metrics, "clip_fraction") == pytest.approx(0.5)
    expected_kl = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2
    assert _mean(metrics, "approx_kl") == pytest.approx(expected_kl)


def test_value_loss_plain_and_clipped() -> None:
    values, old = torch.tensor([[1.0, 3.0]]), torch.zeros(1, 2)
    returns, mask = torch.tensor([[2.0, 0.0]]), torch.ones(1, 2)
    assert value_loss(values, old, returns, mask, clip=None)[0].item() == pytest.approx(5.0)
    assert value_loss(values, old, returns, mask, clip=0.5)[0].item() == pytest.approx(5.625)


def test_a2c_policy_loss_and_its_gradient() -> None:
    logp = torch.tensor([[-1.0, -2.0, -7.0]], requires_grad=True)
    adv = torch.tensor([[2.0, 1.0, 3.0]])
    total, count, _ = a2c_policy_loss(logp, adv, torch.tensor([[1, 1, 0]]))
    assert total.item() == pytest.approx(4.0) and int(count) == 2
    total.backward()
    assert logp.grad.tolist() == [[-2.0, -1.0, 0.0]]  # d/dlogp = -A on kept tokens
