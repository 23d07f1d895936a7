"""The evaluation's statistics: means per task family, oracle pass@k, and paired bootstrap
confidence intervals of differences to the baseline.

Numpy only (no torch), pure functions: the eval stage (trainer/stages/evaluate.py) calls them
on per-prompt values that every rank holds, so every layout gives the same numbers.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

# Resampled means drawn per chunk: bounds the index matrix (chunk x prompts) in memory.
_CHUNK = 256


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float | int | bool]:
    """The mean of a - b over prompts with its paired percentile-bootstrap confidence interval.

    a[i] and b[i] are one measure of two methods on the same prompt i (e.g. 1.0 for a right
    answer). Each of `resamples` resamples draws len(a) prompt indices with replacement, the
    SAME indices for a and b (so what the two share per prompt, e.g. how hard the prompt is,
    cancels), and takes the mean difference over them; the interval is the (1 - level) / 2
    and (1 + level) / 2 quantiles of those means (Efron & Tibshirani 1993, ch. 13). Seeded:
    the same arguments give the same interval.

    Returns {"diff": mean(a - b), "lo", "hi": the interval, "n": prompts, "significant":
    whether the interval excludes 0}. ValueError for no prompts or unequal lengths.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64) if len(a) == len(b) else None
    if d is None:
        raise ValueError(f"paired_bootstrap: {len(a)} values against {len(b)}; pairs need equal lengths")
    if d.size == 0:
        raise ValueError("paired_bootstrap: no prompts to resample")
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"paired_bootstrap: resamples={resamples} (>= 1), level={level} (in (0, 1))")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        count = min(_CHUNK, resamples - start)
        means[start:start + count] = d[rng.integers(0, d.size, size=(count, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": int(d.size),
            "significant": bool(lo > 0.0 or hi < 0.0)}


def pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> list[float]:
    """Per prompt, the unbiased estimate of pass@k from n >= k samples of which c are right:
    1 - C(n - c, k) / C(n, k) (Chen et al. 2021); with n = k, whether any sample is right."""
    out = []
    for row in correct:
        n, c = len(row), int(sum(bool(x) for x in row))
        if n < k:
            raise ValueError(f"pass_at_k: {n} samples for a prompt, fewer than k={k}")
        out.append(1.0 - (math.comb(n - c, k) / math.comb(n, k) if n - c >= k else 0.0))
    return out


# The measures whose difference to the baseline gets a confidence interval (when both have it).
DIFF_KEYS: tuple[str, ...] = ("accuracy", "greedy_accuracy", "gold_reward", "response_length", "reward")
# The measures whose own mean gets a confidence interval ("<key>_ci": [lo, hi]): the report's
# error bars.
CI_KEYS: tuple[str, ...] = ("accuracy",)


def group_indices(groups: Sequence[str]) -> dict[str, list[int]]:
    """The positions of each group label, sorted by label."""
    out: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        out.setdefault(group, []).append(i)
    return dict(sorted(out.items()))


def _means(values: dict[str, list[float]], idx: Sequence[int], resamples: int, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, per in values.items():
        picked = [per[i] for i in idx]
        out[key] = float(np.mean(picked))
        if key in CI_KEYS and resamples > 0:
            found = paired_bootstrap(picked, [0.0] * len(picked), resamples, seed)
            out[f"{key}_ci"] = [found["lo"], found["hi"]]
    return out


def summarize(values: dict[str, list[float]], groups: Sequence[str], resamples: int = 0,
              seed: int = 0) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(means over all prompts, {group: means over its prompts and "prompts": their count}) of
    per-prompt `values` ({measure: one value per prompt}); groups[i] labels prompt i (empty:
    no groups). With resamples > 0, the CI_KEYS also get their bootstrap interval."""
    n = len(next(iter(values.values()), []))
    overall = _means(values, range(n), resamples, seed)
    by_group = {}
    for group, idx in group_indices(groups).items():
        by_group[group] = {**_means(values, idx, resamples, seed), "prompts": len(idx)}
    return overall, by_group


def compare(values: dict[str, list[float]], base: dict[str, list[float]], groups: Sequence[str],
            resamples: int, seed: int) -> dict[str, Any]:
    """Differences of a method's per-prompt values to the baseline's on the same prompts, each
    with its paired_bootstrap interval: {"all": {measure: ...}, "by_family": {group: {measure:
    ...}}} for the DIFF_KEYS both have."""
    keys = [k for k in DIFF_KEYS if k in values and k in base]
    out: dict[str, Any] = {"all": {k: paired_bootstrap(values[k], base[k], resamples, seed) for k in keys},
                           "by_family": {}}
    for group, idx in group_indices(groups).items():
        out["by_family"][group] = {k: paired_bootstrap([values[k][i] for i in idx], [base[k][i] for i in idx],
                                                       resamples, seed) for k in keys}
    return out
