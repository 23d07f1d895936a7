"""Reward sources of the RL stages: a weighted list, each scored and logged on its own.

A source maps a batch of (prompt, response) samples to one float per sample. `ppo.reward_funcs`
names them, `ppo.reward_weights` weighs them (empty: 1.0 each):

    rm                      the reward model of ppo.reward (a frozen scalar-head engine; a
                            collective over this rank's TP/PP group)
    gold                    the embedded world's verifier: 1.0 if the answer is right
    eos                     1.0 if the response ended with a stop token (a format reward)
    regex:<pattern>         1.0 if re.search(pattern, response) matches
    math                    1.0 if math-verify finds the response's answer equal to the
                            prompt's "answer" field (a jsonl column, see trainer/data/readers.py)
    package.module:function a user callable, called as
                                function(prompts, completions, **columns) -> sequence of floats
                            prompts: the last user turn of each prompt (str); completions: the
                            response texts; columns: every per-prompt field of the data as a
                            list aligned with the samples, plus "messages" (the whole prompt as
                            [{"role", "content"}]) and "finished" (stopped on a stop token).

Where sources run: on every rank, each data-parallel rank on its own samples, batched (one
call per rollout and source); the ranks of one TP/PP group pass the same samples, so a user
callable must be deterministic. A source that raises, or returns the wrong count, a
non-number or a non-finite number, stops the run with a RewardError naming the source, the
sample and the value (the iteration saves nothing, so the last checkpoint stays intact).
"""
from __future__ import annotations

import importlib
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from chatforge_config.trainer import NAMED_REWARD_SOURCES as NAMED_SOURCES
from trainer.data.chat import Message


class RewardError(RuntimeError):
    """A reward source failed or returned a bad value; the message names it."""


@dataclass
class Samples:
    """One rank's rollout samples, as the reward sources read them."""

    prompts: list[list[Message]]
    texts: list[str]  # the response texts (stop ids removed)
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    finished: list[bool]
    metadata: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def last_user(self, i: int) -> str:
        users = [m.content for m in self.prompts[i] if m.role == "user"]
        return users[-1] if users else ""


Source = Callable[[Samples], Sequence[Any]]


def source_key(spec: str) -> str:
    """The metric name of a source: reward_<key> (regex and callables shortened to a word)."""
    if spec in NAMED_SOURCES:
        return spec
    if spec.startswith("regex:"):
        return "regex"
    return re.sub(r"\W+", "_", spec.rsplit(":", 1)[-1]).strip("_") or "fn"


def metric_keys(specs: Sequence[str]) -> list[str]:
    """reward_<key> per source, made distinct (regex, regex_2 ...) in the order given."""
    keys: list[str] = []
    for spec in specs:
        key, n = source_key(spec), 2
        while key in keys:
            key, n = f"{source_key(spec)}_{n}", n + 1
        keys.append(key)
    return keys


def import_callable(spec: str) -> Callable[..., Any]:
    """`package.module:function` -> the function; RewardError naming the spec otherwise."""
    module_name, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise RewardError(f"ppo.reward_funcs: cannot import {spec!r}: {exc}") from exc
    if not callable(fn):
        raise RewardError(f"ppo.reward_funcs: {spec!r} is not callable")
    return fn


def _regex(pattern: str) -> Source:
    compiled = re.compile(pattern)
    return lambda s: [1.0 if compiled.search(t) else 0.0 for t in s.texts]


def _eos(s: Samples) -> list[float]:
    return [1.0 if done else 0.0 for done in s.finished]


def _math(s: Samples) -> list[float]:
    from math_verify import parse, verify  # optional heavy import: only when used

    out = []
    for i, text in enumerate(s.texts):
        meta = s.metadata[i] if i < len(s.metadata) else {}
        if "answer" not in meta:
            raise RewardError(f"ppo.reward_funcs: math needs an \"answer\" field for every prompt; "
                              f"sample {i} has fields {sorted(meta)}")
        gold = str(meta["answer"])
        # A bare reference ("42") parses as a number; the response's last answer is searched.
        out.append(1.0 if verify(parse(gold if "$" in gold or "\\" in gold else f"${gold}$"), parse(text)) else 0.0)
    return out


def _user(fn: Callable[..., Any]) -> Source:
    def call(s: Samples) -> Sequence[Any]:
        columns: dict[str, list[Any]] = {}
        for i, meta in enumerate(s.metadata):
            for key in meta:
                columns.setdefault(key, [None] * len(s))[i] = meta[key]
        columns["messages"] = [[{"role": m.role, "content": m.content} for m in p] for p in s.prompts]
        columns["finished"] = list(s.finished)
        return fn([s.last_user(i) for i in range(len(s))], list(s.texts), **columns)
    return call


def build_source(spec: str, reward_model: Optional[Callable[[list[list[int]], list[list[int]]], list[float]]],
                 gold: Optional[Callable[[list[Message], str], float]]) -> Source:
    """The source a ppo.reward_funcs entry names. `reward_model`: scores token ids (needed
    for "rm"); `gold`: the embedded world's verifier (needed for "gold")."""
    if spec == "rm":
        if reward_model is None:
            raise RewardError("ppo.reward_funcs: rm needs ppo.reward (a reward model run)")
        return lambda s: reward_model(s.prompt_ids, s.response_ids)
    if spec == "gold":
        if gold is None:
            raise RewardError("ppo.reward_funcs: gold is the embedded world's verifier: needs data=embedded "
                              "(use math, regex:<pattern> or a callable for your own data)")
        return lambda s: [gold(p, t) for p, t in zip(s.prompts, s.texts)]
    if spec == "eos":
        return _eos
    if spec == "math":
        return _math
    if spec.startswith("regex:"):
        return _regex(spec[len("regex:"):])
    if ":" in spec:
        return _user(import_callable(spec))
    raise RewardError(f"ppo.reward_funcs: unknown source {spec!r}: one of {', '.join(NAMED_SOURCES)}, "
                      "regex:<pattern> or package.module:function")


def checked(spec: str, values: Any, n: int, offset: int = 0) -> list[float]:
    """`values` as n finite floats; RewardError naming the source, the sample index (offset
    by this rank's first sample) and the bad value otherwise."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardError(f"ppo.reward_funcs: {spec} returned {values!r} ({type(values).__name__}): "
                          f"expected a sequence of {n} numbers")
    if len(values) != n:
        raise RewardError(f"ppo.reward_funcs: {spec} returned {len(values)} values for {n} samples")
    out = []
    for i, value in enumerate(values):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, numbers.Real):
            raise RewardError(f"ppo.reward_funcs: {spec} returned {value!r} ({type(value).__name__}) for "
                              f"sample {offset + i}: not a number")
        if not math.isfinite(float(value)):
            raise RewardError(f"ppo.reward_funcs: {spec} returned {value!r} for sample {offset + i}: not finite")
        out.append(float(value))
    return out


@dataclass
class RunningMoments:
    """Running mean and variance of every reward seen (Chan et al.'s parallel update), for
    ppo.reward_norm=running; its state is saved in the checkpoint."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, count: float, total: float, total_sq: float) -> None:
        if count <= 0:
            return
        mean = total / count
        m2 = max(total_sq - count * mean * mean, 0.0)
        delta, new = mean - self.mean, self.count + count
        self.mean += delta * count / new
        self.m2 += m2 + delta * delta * self.count * count / new
        self.count = new

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 0 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


class RewardFunction:
    """The weighted sum of the sources, normalised and clipped (ppo.reward_norm, reward_clip).

    __call__ returns (the weighted sum [n] float64, {reward_<key>: [n] raw score per source});
    `post` normalises and clips the sums of a whole rollout, with `dp_sum` summing small host
    tensors over the data-parallel ranks (batch and running moments are over the whole
    rollout: a collective, called once per iteration on every rank)."""

    def __init__(self, specs: Sequence[str], weights: Sequence[float], sources: Sequence[Source],
                 norm: str = "none", clip: float = 0.0) -> None:
        if weights and len(weights) != len(specs):
            raise RewardError(f"ppo.reward_weights={list(weights)}: {len(weights)} weights for "
                              f"{len(specs)} sources {list(specs)}")
        self.specs, self.sources = list(specs), list(sources)
        self.weights = [float(w) for w in weights] if weights else [1.0] * len(specs)
        self.keys = metric_keys(specs)
        self.norm, self.clip = norm, float(clip)
        self.running = RunningMoments()

    def __call__(self, samples: Samples, offset: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = len(samples)
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros(n, dtype=torch.float64)
        for spec, key, weight, source in zip(self.specs, self.keys, self.weights, self.sources):
            try:
                values = source(samples)
            except RewardError:
                raise
            except Exception as exc:  # a user's function: say which one failed, and on what
                raise RewardError(f"ppo.reward_funcs: {spec} raised {type(exc).__name__}: {exc} "
                                  f"(samples {offset}..{offset + n - 1})") from exc
            scores = torch.tensor(checked(spec, values, n, offset), dtype=torch.float64)
            parts[f"reward_{key}"] = scores.float()
            total += weight * scores
        return total, parts

    def post(self, total: torch.Tensor, dp_sum: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """ppo.reward_norm, then ppo.reward_clip, over this rank's part of a rollout -> float32."""
        total = total.double()
        if self.norm in ("batch", "running"):
            moments = dp_sum(torch.tensor([float(total.numel()), float(total.sum()), float((total * total).sum())],
                                          dtype=torch.float64)).tolist()
            if self.norm == "running":
                self.running.update(*moments)
                mean, std = self.running.mean, self.running.std
            else:
                count = max(moments[0], 1.0)
                mean = moments[1] / count
                std = math.sqrt(max(moments[2] / count - mean * mean, 0.0))
            total = (total - mean) / (std + 1e-8)
        elif self.norm != "none":
            raise RewardError(f"ppo.reward_norm={self.norm!r}: must be none, batch or running")
        if self.clip > 0:
            total = total.clamp(-self.clip, self.clip)
        return total.float()

    def state_dict(self) -> dict[str, Any]:
        return {"running": self.running.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "running" in state:
            self.running.load_state_dict(state["running"])


def group_spread(scores: torch.Tensor, group_size: int) -> np.ndarray:
    """[groups] bool: whether a group's rewards differ (a group of equal rewards carries no
    signal for a group estimator: DAPO's dynamic sampling drops it)."""
    r = scores.double().view(-1, group_size)
    return (r.max(-1).values - r.min(-1).values > 1e-9).numpy()
