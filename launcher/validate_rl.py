"""Checks of the RL stages' settings (ppo.*, stage=ppo|a2c|grpo|dr_grpo|rloo|reinforce_pp),
made before anything starts. Torch-free: a user's reward callable is located and its source
read (ast), never imported here."""
from __future__ import annotations

import ast
import importlib.machinery
import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from chatforge_config.parallel import ModelConfig, model_split_problems
from chatforge_config.trainer import GROUP_ESTIMATORS, NAMED_REWARD_SOURCES as NAMED_SOURCES
from launcher.errors import ConfigError

RANGES = (("ppo.critic_lr", lambda v: v >= 0, "must be >= 0 (0 is optim.lr)"),
          ("ppo.clip", lambda v: v > 0, "must be > 0"),
          ("ppo.clip_low", lambda v: v is None or 0 < v < 1, "must be in (0, 1) (null: ppo.clip)"),
          ("ppo.clip_high", lambda v: v is None or v > 0, "must be > 0 (null: ppo.clip)"),
          ("ppo.value_clip", lambda v: v >= 0, "must be >= 0 (0 is off)"),
          ("ppo.kl_coef", lambda v: v >= 0, "must be >= 0"),
          ("ppo.kl_target", lambda v: v >= 0, "must be >= 0 (0 keeps ppo.kl_coef fixed)"),
          ("ppo.gamma", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
          ("ppo.lam", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
          ("ppo.entropy_coef", lambda v: v >= 0, "must be >= 0"),
          ("ppo.ptx_coef", lambda v: v >= 0, "must be >= 0"),
          ("ppo.missing_eos_penalty", lambda v: v >= 0, "must be >= 0"),
          ("ppo.reward_clip", lambda v: v >= 0, "must be >= 0 (0 is off)"),
          ("ppo.freeze_actor_steps", lambda v: v >= 0, "must be >= 0 (0 is off)"))


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def check_ranges(cfg: DictConfig) -> list[ConfigError]:
    """ppo.* values out of range (whatever the stage: a bad value is bad anywhere)."""
    return [ConfigError(key, _get(cfg, key), what) for key, ok, what in RANGES if not ok(_get(cfg, key))]


def check_rl(cfg: DictConfig) -> list[ConfigError]:
    """Every problem of an RL stage's config: the method's consistency, the reward sources,
    and how the rollout splits over DP ranks, microbatches and minibatches (ranges:
    check_ranges)."""
    errors: list[ConfigError] = []
    ppo, stage = cfg.ppo, str(cfg.stage.name)
    if not cfg.ckpt.load:
        errors.append(ConfigError("ckpt.load", cfg.ckpt.load, f"stage={stage} needs the SFT policy (a run dir)"))
    estimator, group = str(ppo.advantage_estimator), int(ppo.n_samples_per_prompt)
    if estimator in GROUP_ESTIMATORS and group < 2:
        errors.append(ConfigError("ppo.n_samples_per_prompt", group,
                                  f"ppo.advantage_estimator={estimator} compares the samples of a prompt: needs >= 2"))
    low = ppo.clip if ppo.clip_low is None else ppo.clip_low
    high = ppo.clip if ppo.clip_high is None else ppo.clip_high
    if 0 < low < 1 and high > 0 and high < low:
        errors.append(ConfigError("ppo.clip_high", ppo.clip_high, f"must be >= the lower clip {low} (ppo.clip_low)"))
    if stage == "a2c" and estimator != "gae":
        errors.append(ConfigError("ppo.advantage_estimator", estimator, "stage=a2c is the critic's method: needs gae"))
    frozen = int(ppo.freeze_actor_steps)
    if frozen > 0 and estimator != "gae":
        errors.append(ConfigError("ppo.freeze_actor_steps", frozen, f"trains the critic alone: needs a critic "
                                  f"(ppo.advantage_estimator=gae, is {estimator})"))
    if frozen >= int(cfg.train.steps) > 0:
        errors.append(ConfigError("ppo.freeze_actor_steps", frozen,
                                  f"must be < train.steps={cfg.train.steps} (else the actor never trains)"))
    if bool(ppo.dynamic_sampling) and group < 2:
        errors.append(ConfigError("ppo.dynamic_sampling", True, "drops groups of equal rewards: needs "
                                  f"ppo.n_samples_per_prompt >= 2 (is {group})"))
    errors += _check_sources(cfg)
    return errors + _check_split(cfg)


def _check_sources(cfg: DictConfig) -> list[ConfigError]:
    ppo = cfg.ppo
    specs = [str(x) for x in ppo.reward_funcs]
    errors = []
    if not specs:
        errors.append(ConfigError("ppo.reward_funcs", specs, "needs at least one reward source"))
    weights = list(ppo.reward_weights)
    if weights and len(weights) != len(specs):
        errors.append(ConfigError("ppo.reward_weights", weights,
                                  f"{len(weights)} weights for {len(specs)} sources ppo.reward_funcs={specs}"))
    for spec in specs:
        why = source_problem(spec, str(cfg.data.format))
        if why:
            errors.append(ConfigError("ppo.reward_funcs", specs, f"{spec!r}: {why}"))
    critic_rm = str(ppo.advantage_estimator) == "gae" and str(ppo.critic_init) == "reward"
    if ("rm" in specs or critic_rm) and not ppo.reward:
        why = "ppo.reward_funcs names rm" if "rm" in specs else "ppo.critic_init=reward starts the critic from it"
        errors.append(ConfigError("ppo.reward", ppo.reward, f"needs the reward model's run dir ({why})"))
    return errors


def source_problem(spec: str, data_format: str) -> Optional[str]:
    """Why a ppo.reward_funcs entry cannot work, or None."""
    if spec in NAMED_SOURCES:
        if spec == "gold" and data_format != "embedded":
            return "the embedded world's verifier needs data=embedded (math, regex:<pattern> or a callable " \
                   "score other data)"
        return None
    if spec.startswith("regex:"):
        import re

        try:
            re.compile(spec[len("regex:"):])
        except re.error as exc:
            return f"not a regular expression: {exc}"
        return None
    module, sep, name = spec.partition(":")
    if not sep or not module or not name.isidentifier():
        return f"unknown source: one of {', '.join(NAMED_SOURCES)}, regex:<pattern> or package.module:function"
    return callable_problem(module, name)


def callable_problem(module: str, name: str) -> Optional[str]:
    """Whether `module` can be found on sys.path (and the current directory, which the trainer
    processes start in) and its source defines `name`, without importing it."""
    search = [str(Path.cwd())] + [p for p in sys.path if p]
    spec = None
    parts = module.split(".")
    for i in range(len(parts)):
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:i + 1]), search)
        if spec is None:
            return f"cannot import module {module!r} (not found from {Path.cwd()} or sys.path)"
        search = list(spec.submodule_search_locations or [])
    origin = Path(spec.origin) if spec is not None and spec.origin else None
    if origin is None or origin.suffix != ".py" or not origin.is_file():
        return None  # a compiled or namespace module: the trainer finds out
    tree = ast.parse(origin.read_text(encoding="utf-8"), filename=str(origin))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return None if name in names else f"module {module!r} ({origin}) defines no {name!r}"


def _check_split(cfg: DictConfig) -> list[ConfigError]:
    """The rollout (rollout_batch prompts x n samples) splits over DP ranks (whole groups),
    microbatches and, for the clipped methods, minibatches of train.global_batch; a prompt
    leaves room for the response; the reward model splits over this layout."""
    stage = str(cfg.stage.name)
    errors = []
    world = cfg.cluster.nodes * cfg.cluster.procs_per_node
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = world // (tp * pp)
    rollout, mb, gb = cfg.ppo.rollout_batch, cfg.train.micro_batch, cfg.train.global_batch
    n = int(cfg.ppo.n_samples_per_prompt)
    if rollout % dp:
        errors.append(ConfigError("ppo.rollout_batch", rollout,
                                  f"a prompt's samples stay on one rank: must be a multiple of DP = {dp} "
                                  f"(world {world} / (tp {tp} x pp {pp}))"))
    elif (rollout // dp * n) % mb:
        errors.append(ConfigError(
            "ppo.rollout_batch", rollout,
            f"each DP rank's {rollout // dp} prompts x ppo.n_samples_per_prompt={n} responses must be a multiple "
            f"of train.micro_batch={mb}"))
    elif stage != "a2c" and (rollout * n) % gb:
        errors.append(ConfigError(
            "ppo.rollout_batch", rollout,
            f"stage={stage} splits the rollout's {rollout} x ppo.n_samples_per_prompt={n} responses into "
            f"minibatches: must be a multiple of train.global_batch={gb}"))
    if cfg.ppo.reward:
        errors.extend(_check_reward_model_split(cfg, tp, pp))
    new, seq = cfg.sampling.max_new_tokens, cfg.model.seq_length
    if new >= seq:
        errors.append(ConfigError(
            "sampling.max_new_tokens", new,
            f"stage={stage} needs room for the prompt: must be < model.seq_length={seq}"))
    return errors


def _check_reward_model_split(cfg: DictConfig, tp: int, pp: int) -> list[ConfigError]:
    """The reward model (and a critic made from it) runs at this run's layout, with its own
    model config: it must split over the same TP ranks and PP stages. Its config.yaml is
    the run dir's or the step dir's (a checkpoints/ dir has it one level up)."""
    where = Path(str(cfg.ppo.reward)).expanduser()
    found = [p for p in (where / "config.yaml", where.parent / "config.yaml") if p.is_file()]
    if not found:
        return []  # the path check reports a missing path; the trainer names other problems
    model = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(found[0]).get("model", {}))
    return [ConfigError("ppo.reward", cfg.ppo.reward,
                        f"the reward model cannot run at this layout: its {key}={value} {what}")
            for key, value, what in model_split_problems(model, tp, pp)]
