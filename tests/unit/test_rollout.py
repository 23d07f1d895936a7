"""The rollout's pieces that need no model: prompt order, the KL controller, vocab-parallel
log-probs and entropy (one TP rank here; TP2 is covered by tests/dist/test_rlhf.py), and
the advantage functions on the rollout's label-aligned layout (responses start after the
prompt, not at column 0)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from parallel.vocab import logprobs_and_entropy
from trainer.losses import gae, kl_penalty_rewards, masked_moments, whiten
from trainer.rollout import KLController, PromptSampler


def test_prompt_sampler_visits_every_prompt_once_per_epoch_and_resumes() -> None:
    sampler = PromptSampler(count=5, seed=3)
    taken = sampler.take(3) + sampler.take(4) + sampler.take(3)
    assert sorted(taken[:5]) == list(range(5)) and sorted(taken[5:]) == list(range(5))
    assert taken[:5] != taken[5:]  # a new permutation each epoch (seeded: fixed for seed 3)
    again = PromptSampler(count=5, seed=3)
    again.load_state_dict({"consumed": 3})
    assert again.take(7) == taken[3:]
    assert sampler.state_dict() == {"consumed": 10}


def test_kl_controller_fixed_and_adaptive() -> None:
    fixed = KLController(beta=0.1)
    fixed.update(kl=50.0, n=64)
    assert fixed.beta == 0.1
    adaptive = KLController(beta=0.1, target=2.0, horizon=100)
    adaptive.update(kl=3.0, n=10)  # error = clip(3/2 - 1) = 0.2 (clipped from 0.5)
    assert adaptive.beta == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    adaptive.update(kl=1.8, n=10)  # error = 1.8/2 - 1 = -0.1
    assert adaptive.beta == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 10 / 100))
    restored = KLController(beta=0.5, target=2.0, horizon=100)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.beta == adaptive.beta


def test_logprobs_and_entropy_match_log_softmax_over_the_real_vocabulary() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 12, requires_grad=True)  # 12 columns, the tokenizer has 10
    labels = torch.randint(0, 10, (2, 5))
    logp, entropy = logprobs_and_entropy(logits, labels, vocab_size=10, group=None)
    ref = torch.log_softmax(logits[..., :10], dim=-1)
    ref_logp = ref.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ref_entropy = -(ref.exp() * ref).sum(-1)
    assert torch.allclose(logp, ref_logp, atol=1e-6) and torch.allclose(entropy, ref_entropy, atol=1e-6)
    grad = torch.autograd.grad(logp.sum() + 0.3 * entropy.sum(), logits)[0]
    ref_grad = torch.autograd.grad(ref_logp.sum() + 0.3 * ref_entropy.sum(), logits)[0]
    assert torch.allclose(grad, ref_grad, atol=1e-6)
    assert torch.all(grad[..., 10:] == 0)  # the padding columns are not part of the policy


def test_gae_on_responses_after_a_prompt_equals_gae_on_the_response_alone() -> None:
    """A response occupying columns 3..5 of a row (prompt before, padding after) gets the
    advantages of the same 3-step episode starting at column 0."""
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.5, -0.2, 1.0]])
    values = torch.tensor([[0.3, 0.1, -0.4]])
    alone_adv, alone_ret = gae(rewards, values, torch.ones(1, 3), gamma, lam)
    row_r = torch.zeros(1, 8)
    row_v = torch.full((1, 8), 7.0)  # values outside the response must not leak in
    mask = torch.zeros(1, 8)
    row_r[0, 3:6], row_v[0, 3:6], mask[0, 3:6] = rewards[0], values[0], 1.0
    adv, ret = gae(row_r, row_v, mask, gamma, lam)
    assert torch.allclose(adv[0, 3:6], alone_adv[0]) and torch.allclose(ret[0, 3:6], alone_ret[0])
    assert torch.all(adv[0, :3] == 0) and torch.all(adv[0, 6:] == 0)
    # Hand-computed: delta = r + gamma V' - V with V' = 0 after the last token.
    d = [0.5 + 0.9 * 0.1 - 0.3, -0.2 + 0.9 * -0.4 - 0.1, 1.0 - (-0.4)]
    a2 = d[2]
    a1 = d[1] + gamma * lam * a2
    a0 = d[0] + gamma * lam * a1
    assert alone_adv[0].tolist() == pytest.approx([a0, a1, a2], abs=1e-6)


def test_kl_penalty_reward_lands_on_each_rows_last_response_token() -> None:
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.float32)
    logp = torch.full((2, 5), -1.0)
    ref = torch.full((2, 5), -1.5)
    rewards = kl_penalty_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, beta=0.2)
    expected = -0.2 * 0.5 * mask
    expected[0, 3] += 2.0
    expected[1, 2] += -1.0
    assert torch.allclose(rewards, expected)


def test_whitening_with_summed_moments_equals_whitening_the_concatenation() -> None:
    """Two data-parallel ranks each whiten with the moments summed over both: the same
    numbers as whitening the whole rollout in one place."""
    rng = np.random.default_rng(0)
    a, b = (torch.tensor(rng.normal(size=(3, 6)), dtype=torch.float32) for _ in range(2))
    ma, mb = (torch.tensor(rng.integers(0, 2, size=(3, 6)), dtype=torch.float32) for _ in range(2))
    moments = masked_moments(a, ma) + masked_moments(b, mb)
    whole = whiten(torch.cat([a, b]), torch.cat([ma, mb]))
    split = torch.cat([whiten(a, ma, moments=moments), whiten(b, mb, moments=moments)])
    assert torch.allclose(whole, split, atol=1e-5)
    kept = whole[torch.cat([ma, mb]) > 0]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert math.sqrt((kept ** 2).mean().item()) == pytest.approx(1.0, abs=1e-3)
