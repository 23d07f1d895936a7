"""The evaluation's statistics: the paired bootstrap against hand-checkable cases and the normal
approximation, pass@k, and per-family summaries and differences."""
from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.eval_stats import compare, paired_bootstrap, pass_at_k, summarize


def test_bootstrap_of_two_prompts_spans_every_resample_mean() -> None:
    # Differences (0, 1): a resample of two prompts has mean 0, 1/2 or 1 with probabilities
    # 1/4, 1/2, 1/4, so the 2.5% quantile is 0 and the 97.5% quantile is 1.
    found = paired_bootstrap([1.0, 1.0], [1.0, 0.0], resamples=2000, seed=3)
    assert found == {"diff": 0.5, "lo": 0.0, "hi": 1.0, "n": 2, "significant": False}


def test_a_constant_difference_has_a_point_interval_and_is_significant() -> None:
    found = paired_bootstrap([1.0, 0.5, 0.25], [0.75, 0.25, 0.0], resamples=500, seed=0)
    assert found["diff"] == found["lo"] == found["hi"] == pytest.approx(0.25)
    assert found["significant"]
    same = paired_bootstrap([1.0, 0.0, 1.0], [1.0, 0.0, 1.0], resamples=500, seed=0)
    assert (same["diff"], same["lo"], same["hi"], same["significant"]) == (0.0, 0.0, 0.0, False)


def test_pairing_cancels_what_both_share() -> None:
    # b = a - 0.1 on every prompt, with prompts of very different difficulty: the paired
    # interval is the point 0.1; unpaired, the prompts' spread would make it wide.
    a = np.linspace(0.0, 1.0, 50)
    found = paired_bootstrap(a, a - 0.1, resamples=300, seed=1)
    assert found["lo"] == pytest.approx(0.1) and found["hi"] == pytest.approx(0.1)


def test_bootstrap_matches_the_normal_approximation_on_a_large_sample() -> None:
    rng = np.random.default_rng(7)
    n = 4000
    b = (rng.random(n) < 0.5).astype(float)
    a = np.where(rng.random(n) < 0.3, 1.0 - b, b)  # correlated with b, mean about 0.5
    a[rng.random(n) < 0.08] = 1.0  # a gain of a few points
    d = a - b
    half = 1.96 * d.std(ddof=1) / math.sqrt(n)
    found = paired_bootstrap(a, b, resamples=4000, seed=11)
    assert found["diff"] == pytest.approx(d.mean())
    assert found["lo"] == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert found["hi"] == pytest.approx(d.mean() + half, abs=0.1 * half)
    assert found["significant"] == (abs(d.mean()) > half)


def test_bootstrap_is_seeded_and_refuses_bad_input() -> None:
    a, b = list(np.random.default_rng(0).random(30)), [0.5] * 30
    assert paired_bootstrap(a, b, 100, seed=5) == paired_bootstrap(a, b, 100, seed=5)
    assert paired_bootstrap(a, b, 100, seed=5) != paired_bootstrap(a, b, 100, seed=6)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap([1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="no prompts"):
        paired_bootstrap([], [])


def test_pass_at_k_is_the_unbiased_estimator() -> None:
    # n = 3 samples, c = 1 right: pass@2 = 1 - C(2, 2) / C(3, 2) = 2/3; n = k: any right.
    assert pass_at_k([[True, False, False], [False] * 3, [True] * 3], 2) == pytest.approx([2 / 3, 0.0, 1.0])
    assert pass_at_k([[False, True], [False, False]], 2) == [1.0, 0.0]
    with pytest.raises(ValueError, match="fewer than k"):
        pass_at_k([[True]], 2)


def test_summaries_and_differences_per_family() -> None:
    values = {"accuracy": [1.0, 0.0, 1.0, 1.0], "kl": [1.0, 2.0, 3.0, 4.0]}
    base = {"accuracy": [0.0, 0.0, 1.0, 0.0], "kl": [0.0] * 4}
    overall, by_family = summarize(values, ["b", "a", "b", "a"], resamples=200, seed=0)
    assert overall["accuracy"] == 0.75 and overall["kl"] == 2.5
    assert by_family == {"a": {"accuracy": 0.5, "accuracy_ci": [0.0, 1.0], "kl": 3.0, "prompts": 2},
                         "b": {"accuracy": 1.0, "accuracy_ci": [1.0, 1.0], "kl": 2.0, "prompts": 2}}
    diffs = compare(values, base, ["b", "a", "b", "a"], resamples=200, seed=0)
    assert set(diffs["all"]) == {"accuracy"}  # kl is not a difference the report shows
    assert diffs["all"]["accuracy"]["diff"] == 0.5
    assert diffs["by_family"]["a"]["accuracy"]["diff"] == 0.5 and diffs["by_family"]["b"]["accuracy"]["n"] == 2
