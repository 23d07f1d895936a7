"""The post-training losses against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import dpo_loss, pairwise_reward_loss, read_reward, sequence_logprobs


def _value(metrics: dict[str, torch.Tensor], name: str) -> float:
    total, count = metrics[name].tolist()
    return total / count


def test_read_reward_last_and_mean() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 1]])
    assert read_reward(values, mask, "last").tolist() == [3.0, 8.0]
    assert read_reward(values, mask, "mean").tolist() == [2.5, 8.0]
    with pytest.raises(ValueError, match="rm.reduce"):
        read_reward(values, mask, "max")


def test_pairwise_reward_loss() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    total, count, metrics = pairwise_reward_loss(chosen, rejected)
    expected = -math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0)))
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert int(count) == 2
    assert _value(metrics, "accuracy") == 0.5
    assert _value(metrics, "margin") == 0.0
    total_m, _, _ = pairwise_reward_loss(chosen, rejected, margin=1.0)
    assert total_m.item() == pytest.approx(-math.log(0.5) - math.log(1 / (1 + math.exp(2.0))), rel=1e-6)


def test_sequence_logprobs() -> None:
    nll = torch.tensor([[0.5, 1.0, 2.0], [0.1, 0.2, 0.3]])
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    assert sequence_logprobs(nll, mask).tolist() == pytest.approx([-3.0, -0.1])


def test_dpo_sigmoid_ipo_and_smoothing() -> None:
    pc, pr = torch.tensor([-1.0]), torch.tensor([-3.0])
    rc, rr = torch.tensor([-2.0]), torch.tensor([-2.0])
    # h = (-1 - -2) - (-3 - -2) = 2
    beta = 0.5
    total, _, metrics = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert total.item() == pytest.approx(math.log(1 + math.exp(-1.0)), rel=1e-6)
    assert _value(metrics, "accuracy") == 1.0
    assert _value(metrics, "margin") == pytest.approx(1.0)
    assert _value(metrics, "kl") == pytest.approx(0.0)  # (1 + -1) / 2
    smooth, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.1)
    assert smooth.item() == pytest.approx(0.9 * math.log(1 + math.exp(-1.0)) + 0.1 * math.log(1 + math.exp(1.0)), rel=1e-6)
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, kind="ipo")
    assert ipo.item() == pytest.approx((2.0 - 1.0) ** 2)
    with pytest.raises(ValueError, match="dpo.loss"):
        dpo_loss(pc, pr, rc, rr, beta=beta, kind="kto")
