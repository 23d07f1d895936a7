"""Check a composed config before any process starts.

Every error names the dotted config key and its bad value, so a user can fix the command
line without reading a traceback. `find_errors` collects every problem (the CLI prints one
line per error); `validate` raises the first. Checks that need a valid value (a division by
`parallel.tp`, say) are skipped while that value is itself reported as bad, so one mistake
gives one message.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

from parallel.config import LORA_TARGETS, ModelConfig, lora_targets, model_split_problems
from trainer.data.chat_embedded import EVAL_TASKS, PREFERENCES  # torch-free (random, sentencepiece)
from trainer.stages import NO_TRAINING, RL_STAGES, SAMPLING_STAGES, STAGE_DATA, STAGE_HEAD, STAGES

# The one place that lists the allowed values of every enumerated string field (the
# dataclass comments mirror it; OmegaConf cannot type-check Literal annotations).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.position_embedding": ("learned", "rope"),
    "model.normalization": ("LayerNorm", "RMSNorm"),
    "model.activation": ("gelu", "gelu_tanh", "swiglu"),
    "model.head": ("lm", "scalar"),
    "parallel.precision": ("fp32", "bf16"),
    "parallel.recompute": ("none", "selective", "full"),
    "optim.name": ("adam", "adamw", "adam8bit"),
    "optim.decay": ("cosine", "linear", "constant"),
    "logger": ("wandb", "none"),
    "wandb.mode": ("auto", "offline", "online"),
    "data.format": ("embedded", "text", "chatml", "alpaca", "hh_rlhf", "preference"),
    "data.overlong": ("truncate", "drop"),
    "data.embedded.prefer": PREFERENCES,
    "data.embedded.eval_tasks": EVAL_TASKS,
    "stage.name": tuple(STAGES),
    "rm.reduce": ("last", "mean"),
    "dpo.loss": ("sigmoid", "ipo"),
    "ppo.critic_init": ("reward", "policy"),
    "tokenizer.model_type": ("bpe", "unigram"),
    "ckpt.load_state": ("weights", "full"),
    "cluster.name": ("local", "slurm"),
}

# Integer sizes that must be >= 1 (anything else would divide by zero or mean nothing).
POSITIVE: tuple[str, ...] = (
    "cluster.nodes",
    "cluster.procs_per_node",
    "cluster.threads_per_proc",
    "parallel.tp",
    "parallel.pp",
    "parallel.recompute_num_layers",
    "model.num_layers",
    "model.hidden_size",
    "model.num_attention_heads",
    "model.seq_length",
    "model.make_vocab_size_divisible_by",
    "train.steps",
    "train.global_batch",
    "train.micro_batch",
    "best_of_n.n",
    "sampling.max_new_tokens",
    "sampling.batch",
    "ppo.rollout_batch",
    "ppo.epochs",
    "ppo.kl_horizon",
    "eval.pass_k",
    "eval.bootstrap",
)

# Optional sizes: None means "derive it", any set value must be >= 1.
OPTIONAL_POSITIVE: tuple[str, ...] = ("model.num_query_groups", "model.ffn_hidden_size")

# What the layout arithmetic divides by or compares.
LAYOUT_KEYS: tuple[str, ...] = (
    "cluster.name", "cluster.nodes", "cluster.procs_per_node", "parallel.tp", "parallel.pp",
    "model.num_layers", "model.hidden_size", "model.num_attention_heads",
    "train.global_batch", "train.micro_batch", "model.make_vocab_size_divisible_by",
) + OPTIONAL_POSITIVE


class ConfigError(ValueError):
    """A bad config value; str() reads `<key>=<value>: <message>`."""

    def __init__(self, key: str, value: object, message: str) -> None:
        self.key = key
        self.value = value
        self.message = message
        super().__init__(f"{key}={format_value(value)}: {message}")


def format_value(value: object) -> str:
    """Render a value the way a user would type it on the command line."""
    if value is None:
        return "null"
    if value == "":
        return "''"
    return str(value)


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def _check_choices(cfg: DictConfig) -> list[ConfigError]:
    errors = []
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            errors.append(ConfigError(key, value, f"must be one of {', '.join(allowed)}"))
    return errors


def _check_positive(cfg: DictConfig) -> list[ConfigError]:
    errors = []
    for key in POSITIVE + OPTIONAL_POSITIVE:
        value = _get(cfg, key)
        if value is None and key in OPTIONAL_POSITIVE:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            errors.append(ConfigError(key, value, "must be an integer >= 1"))
    lr = _get(cfg, "optim.lr")
    if not isinstance(lr, (int, float)) or lr <= 0:
        errors.append(ConfigError("optim.lr", lr, "must be > 0"))
    for key in ("ckpt.every", "optim.warmup_steps", "eval.rm_pairs"):
        value = _get(cfg, key)
        if not isinstance(value, int) or value < 0:
            errors.append(ConfigError(key, value, "must be an integer >= 0"))
    return errors


def _check_layout(cfg: DictConfig) -> list[ConfigError]:
    """Parallel sizes against the world, the model shape and the batch (Megatron's rules)."""
    nodes, ppn = _get(cfg, "cluster.nodes"), _get(cfg, "cluster.procs_per_node")
    tp, pp = _get(cfg, "parallel.tp"), _get(cfg, "parallel.pp")
    world = nodes * ppn
    world_text = f"the world size {world} (cluster.nodes={nodes} x cluster.procs_per_node={ppn})"
    if world % tp:
        return [ConfigError("parallel.tp", tp, f"must divide {world_text}")]
    if world % (tp * pp):
        return [ConfigError("parallel.pp", pp, f"tp*pp = {tp}*{pp} must divide {world_text}")]
    errors = []
    if cfg.cluster.name == "local" and nodes != 1:
        errors.append(ConfigError(
            "cluster.nodes", nodes, "must be 1: cluster=local runs every rank on this machine"))
    errors.extend(_check_model_split(cfg.model, tp, pp))
    dp = world // (tp * pp)
    gb, mb = cfg.train.global_batch, cfg.train.micro_batch
    if gb % (mb * dp):
        errors.append(ConfigError(
            "train.global_batch", gb,
            f"must be a multiple of train.micro_batch x DP = {mb} x {dp} = {mb * dp} "
            f"(DP = world {world} / (tp {tp} x pp {pp}))",
        ))
    return errors


def _check_model_split(model: DictConfig, tp: int, pp: int) -> list[ConfigError]:
    """Heads, KV groups, MLP and vocabulary across TP ranks; layers across PP stages."""
    return [ConfigError(key, value, what) for key, value, what in model_split_problems(model, tp, pp)]


def _missing_file(path: str) -> Optional[str]:
    """Why `path` is not a readable file, or None when it is."""
    p = Path(path).expanduser()
    if not p.exists():
        return f"no such file: {p}"
    if not p.is_file():
        return f"not a file: {p}"
    if not os.access(p, os.R_OK):
        return f"not readable: {p}"
    return None


def _check_stage(cfg: DictConfig) -> list[ConfigError]:
    """The stage against its data, model head, inputs and hyperparameter ranges."""
    stage, fmt = cfg.stage.name, cfg.data.format
    errors = []
    if fmt not in STAGE_DATA[stage]:
        errors.append(ConfigError("data.format", fmt, f"stage={stage} reads one of {', '.join(STAGE_DATA[stage])}"))
    head = STAGE_HEAD.get(stage, "lm")
    if cfg.model.head != head:
        errors.append(ConfigError("model.head", cfg.model.head, f"stage={stage} needs model.head={head}"))
    if stage in SAMPLING_STAGES or stage in RL_STAGES:
        reward = "best_of_n.reward" if stage in SAMPLING_STAGES else "ppo.reward"
        policy = "the policy to sample from" if stage in SAMPLING_STAGES else "the SFT policy (a run dir)"
        for key, what in (("ckpt.load", policy), (reward, "the reward model's run dir")):
            if not _get(cfg, key):
                errors.append(ConfigError(key, _get(cfg, key), f"stage={stage} needs {what}"))
    ranges = (("dpo.beta", lambda v: v > 0, "must be > 0"),
              ("dpo.label_smoothing", lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
              ("data.embedded.flip", lambda v: 0 <= v < 1, "must be in [0, 1)"),
              ("data.embedded.same_style", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
              ("sampling.temperature", lambda v: v >= 0, "must be >= 0 (0 is greedy)"),
              ("sampling.top_p", lambda v: 0 < v <= 1, "must be in (0, 1]"),
              ("sampling.top_k", lambda v: v >= 0, "must be >= 0 (0 is off)"),
              ("ppo.critic_lr", lambda v: v >= 0, "must be >= 0 (0 is optim.lr)"),
              ("ppo.clip", lambda v: v > 0, "must be > 0"),
              ("ppo.value_clip", lambda v: v >= 0, "must be >= 0 (0 is off)"),
              ("ppo.kl_coef", lambda v: v >= 0, "must be >= 0"),
              ("ppo.kl_target", lambda v: v >= 0, "must be >= 0 (0 keeps ppo.kl_coef fixed)"),
              ("ppo.gamma", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
              ("ppo.lam", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
              ("ppo.entropy_coef", lambda v: v >= 0, "must be >= 0"),
              ("ppo.ptx_coef", lambda v: v >= 0, "must be >= 0"),
              ("ppo.missing_eos_penalty", lambda v: v >= 0, "must be >= 0"))
    for key, ok, what in ranges:
        value = _get(cfg, key)
        if not ok(value):
            errors.append(ConfigError(key, value, what))
    return errors


def _check_rl(cfg: DictConfig) -> list[ConfigError]:
    """PPO/A2C: the rollout splits evenly over DP ranks and microbatches (and, for PPO, into
    minibatches of train.global_batch); a prompt leaves room for the response."""
    stage = cfg.stage.name
    if stage not in RL_STAGES:
        return []
    errors = []
    world = cfg.cluster.nodes * cfg.cluster.procs_per_node
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = world // (tp * pp)
    rollout, mb, gb = cfg.ppo.rollout_batch, cfg.train.micro_batch, cfg.train.global_batch
    if rollout % (mb * dp):
        errors.append(ConfigError(
            "ppo.rollout_batch", rollout,
            f"must be a multiple of train.micro_batch x DP = {mb} x {dp} = {mb * dp} "
            f"(DP = world {world} / (tp {tp} x pp {pp}))"))
    elif stage == "ppo" and rollout % gb:
        errors.append(ConfigError(
            "ppo.rollout_batch", rollout,
            f"stage=ppo splits the rollout into minibatches: must be a multiple of "
            f"train.global_batch={gb}"))
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
        return []  # _check_paths reports a missing path; the trainer names other problems
    model = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(found[0]).get("model", {}))
    return [ConfigError("ppo.reward", cfg.ppo.reward,
                        f"the reward model cannot run at this layout: its {key}={value} {what}")
            for key, value, what in model_split_problems(model, tp, pp)]


def _check_paths(cfg: DictConfig, pending: frozenset[str] = frozenset()) -> list[ConfigError]:
    """Inputs exist: data, tokenizer, checkpoints. `pending`: paths an earlier step of a
    recipe will write (they count as present)."""
    errors = []
    if cfg.data.format not in ("embedded", "text"):
        raw = cfg.data.path or ""
        why = _missing_file(raw) if raw else f"data.format={cfg.data.format} needs data.path=<file>"
        if why:
            errors.append(ConfigError("data.path", raw, why))
    if cfg.data.format == "text":
        raw = cfg.data.path or ""
        parts = [part.strip() for part in raw.split(",")]
        if not raw.strip() or not all(parts):
            errors.append(ConfigError(
                "data.path", raw, "data.format=text needs data.path=<file>[,<file>...]"))
        else:
            problems = [why for why in map(_missing_file, parts) if why]
            if problems:
                errors.append(ConfigError("data.path", raw, "; ".join(problems)))
    tokenizer = cfg.tokenizer.path
    if tokenizer and tokenizer not in pending and (why := _missing_file(tokenizer)):
        errors.append(ConfigError("tokenizer.path", tokenizer, why))
    for key in ("ckpt.load", "best_of_n.reward", "ppo.reward", "eval.baseline", "eval.reward",
                "eval.models", "eval.runs"):
        value = _get(cfg, key)
        for load in [p.strip() for p in str(value or "").split(",") if p.strip()]:
            if load not in pending and not Path(load).expanduser().exists():
                errors.append(ConfigError(key, value, f"no such run or checkpoint: {Path(load).expanduser()}"))
    if cfg.stage.name == "eval" and not str(cfg.eval.models).strip():
        errors.append(ConfigError("eval.models", cfg.eval.models, "stage=eval needs the run dirs to evaluate"))
    return errors


def _check_memory_savers(cfg: DictConfig) -> list[ConfigError]:
    """LoRA's values and its base; 8-bit Adam. A stage that trains nothing ignores lora.*."""
    errors = []
    if _get(cfg, "optim.name") == "adam8bit":
        errors.append(ConfigError(
            "optim.name", "adam8bit", "8-bit Adam (bitsandbytes) is not supported: chatforge's "
            "reshardable optimizer checkpoints and distributed optimizer keep Adam's moments in fp32; "
            "use parallel.distributed_optimizer=true (shards them over DP) or lora.rank > 0 "
            "(moments for the adapters only); docs/lora.md"))
    rank = _get(cfg, "lora.rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        return errors + [ConfigError("lora.rank", rank, "must be an integer >= 0 (0 is off)")]
    if rank == 0 or _get(cfg, "stage.name") in NO_TRAINING:
        return errors
    alpha, dropout = _get(cfg, "lora.alpha"), _get(cfg, "lora.dropout")
    if not alpha > 0:
        errors.append(ConfigError("lora.alpha", alpha, "must be > 0 (the adapter's scale is alpha / rank)"))
    if not 0 <= dropout < 1:
        errors.append(ConfigError("lora.dropout", dropout, "must be in [0, 1)"))
    targets = lora_targets(cfg.lora)
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad or not targets or len(set(targets)) != len(targets):
        errors.append(ConfigError("lora.targets", _get(cfg, "lora.targets"),
                                  f"must be distinct names among {','.join(LORA_TARGETS)}, comma-separated"))
    if not _get(cfg, "ckpt.load"):
        errors.append(ConfigError("lora.rank", rank, "adapters train on a frozen base model: needs ckpt.load "
                                                     "(the run or checkpoint to adapt)"))
    return errors


def _bad_keys(errors: Iterable[ConfigError]) -> set[str]:
    return {error.key for error in errors}


def find_errors(cfg: DictConfig | Any, pending: frozenset[str] = frozenset()) -> list[ConfigError]:
    """Every problem in `cfg` (a composed DictConfig or a trainer.config.Config), in order.
    `pending`: paths that do not exist yet but will (a recipe's earlier steps write them)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    errors = _check_choices(cfg) + _check_positive(cfg)
    # Arithmetic on a value already reported as bad would only repeat (or crash on) it.
    dependent: list[tuple[Callable[[DictConfig], list[ConfigError]], tuple[str, ...]]] = [
        (_check_layout, LAYOUT_KEYS),
        (lambda c: _check_paths(c, pending), ("data.format",)),
        (_check_stage, ("stage.name", "data.format", "model.head")),
        (_check_memory_savers, ("stage.name", "optim.name")),
        (_check_rl, ("stage.name", "ppo.rollout_batch", "sampling.max_new_tokens", "model.seq_length")
         + LAYOUT_KEYS),
    ]
    for check, needs in dependent:
        if not _bad_keys(errors) & set(needs):
            errors.extend(check(cfg))
    if "cluster.name" not in _bad_keys(errors):
        from launcher.validate_cluster import find_cluster_errors  # imports this module

        errors.extend(find_cluster_errors(cfg, layout_ok=not _bad_keys(errors) & set(LAYOUT_KEYS)))
    return errors


def validate(cfg: DictConfig | Any) -> None:
    """Raise the first ConfigError in `cfg`; return quietly when it is runnable."""
    errors = find_errors(cfg)
    if errors:
        raise errors[0]
