"""Check a composed config before any process starts.

Every error names the dotted config key and its bad value, so a user can fix the command
line without reading a traceback. `find_errors` collects every problem (the CLI prints one
line per error); `validate` raises the first. Checks that need a valid value (a division by
`parallel.tp`, say) are skipped while that value is itself reported as bad, so one mistake
gives one message.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

from chatforge_config.parallel import LORA_TARGETS, lora_targets, model_split_problems
from chatforge_config.trainer import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS
from launcher.errors import ConfigError
from launcher.validate_cluster import find_cluster_errors
from launcher.validate_run import check_local_device, check_tokenizer
from trainer.data.chat_embedded import EVAL_TASKS, PREFERENCES  # torch-free (random, sentencepiece)
from trainer.data.corpus import TASKS  # torch-free
from trainer.data.readers import detect_format, sniff  # torch-free (json; `datasets` only when read)
from trainer.data.sources import columns_of, has_text_files, missing_path_problem
from trainer.faults import parse_crash  # torch-free
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
    "parallel.layer_spec": ("local", "te"),
    "optim.name": ("adam", "adamw", "adam8bit"),
    "optim.decay": ("cosine", "linear", "constant"),
    "logger": ("wandb", "none"),
    "wandb.mode": ("auto", "offline", "online"),
    "data.format": ("embedded", "text", "chatml", "alpaca", "hh_rlhf", "preference", "prompts", "auto"),
    "data.overlong": ("truncate", "drop"),
    "data.embedded.prefer": PREFERENCES,
    "data.embedded.eval_tasks": EVAL_TASKS,
    "stage.name": tuple(STAGES),
    "rm.score": ("value", "logprob"),
    "rm.reduce": ("last", "mean", "sum"),
    "dpo.loss": ("sigmoid", "ipo"),
    "ppo.critic_init": ("reward", "policy"),
    "ppo.advantage_estimator": ADVANTAGE_ESTIMATORS,
    "ppo.loss_agg": LOSS_AGGREGATIONS,
    "ppo.ratio_level": ("token", "sequence"),
    "ppo.kl_in": ("reward", "loss"),
    "ppo.kl_estimator": KL_ESTIMATORS,
    "ppo.reward_norm": ("none", "batch", "running"),
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
    "train.max_bad_steps",
    "train.fault.nan_grad_steps",
    "data.embedded.num_docs",
    "data.embedded.num_chats",
    "data.embedded.num_pairs",
    "data.embedded.num_prompts",
    "best_of_n.n",
    "sampling.max_new_tokens",
    "sampling.batch",
    "ppo.rollout_batch",
    "ppo.epochs",
    "ppo.kl_horizon",
    "ppo.n_samples_per_prompt",
    "ppo.max_sampling_rounds",
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


# Ranges of numeric keys every stage reads (found by driving each key past its edges: each
# of these failed on a rank, in a library, or trained on garbage). Stage-specific ranges are
# in _check_stage.
RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("train.eval_every", lambda v: v >= 0, "must be >= 0 (0: only at the end)"),
    ("train.eval_batches", lambda v: v >= 0, "must be >= 0"),
    ("train.log_every", lambda v: v >= 0, "must be >= 0"),
    ("train.exit_interval", lambda v: v >= 0, "must be >= 0 (0 is off)"),
    ("train.max_minutes", lambda v: v >= 0, "must be >= 0 (0: no limit)"),
    ("train.hang_timeout", lambda v: v == 0 or v >= 1, "must be 0 (off) or >= 1 second"),
    ("optim.min_lr", lambda v: v >= 0, "must be >= 0"),
    ("optim.weight_decay", lambda v: v >= 0, "must be >= 0"),
    ("optim.beta1", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("optim.beta2", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("optim.eps", lambda v: v > 0, "must be > 0 (Adam divides by sqrt(v) + eps)"),
    ("optim.clip_grad", lambda v: v >= 0, "must be >= 0 (0: no clipping)"),
    ("optim.decay_steps", lambda v: v is None or v >= 0, "must be null or >= 0 (null, 0: train.steps)"),
    ("model.hidden_dropout", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("model.attention_dropout", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("model.init_std", lambda v: v > 0, "must be > 0"),
    ("model.layernorm_epsilon", lambda v: v > 0, "must be > 0"),
    ("model.rotary_base", lambda v: v > 0, "must be > 0"),
    ("data.eval_fraction", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("tokenizer.max_sentences", lambda v: v >= 0, "must be >= 0 (0: all)"),
    ("best_of_n.num_prompts", lambda v: v >= 0, "must be >= 0 (0: all)"),
)


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
    errors += _check_ranges(cfg)
    for key in ("ckpt.every", "optim.warmup_steps", "train.fault.nan_grad_step", "train.fault.nan_grad_rank",
                "train.fault.crash_rank", "eval.rm_pairs"):
        value = _get(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            errors.append(ConfigError(key, value, "must be an integer >= 0"))
    return errors


def _leaves(tree: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}{key}.")
    elif not isinstance(tree, list):
        yield prefix[:-1], tree


def _check_ranges(cfg: DictConfig) -> list[ConfigError]:
    """No NaN or infinity anywhere; RANGES; the LR schedule's own rule (megatron asserts it)."""
    errors = [ConfigError(key, value, "must be a finite number")
              for key, value in _leaves(OmegaConf.to_container(cfg, resolve=False))
              if isinstance(value, float) and not math.isfinite(value)]
    bad = _bad_keys(errors)
    errors += [ConfigError(key, _get(cfg, key), what) for key, ok, what in RANGES
               if key not in bad and not ok(_get(cfg, key))]
    lr, min_lr = _get(cfg, "optim.lr"), _get(cfg, "optim.min_lr")
    if (_get(cfg, "optim.decay") != "constant" and not _bad_keys(errors) & {"optim.lr", "optim.min_lr"}
            and isinstance(lr, (int, float)) and min_lr > lr):
        errors.append(ConfigError("optim.min_lr", min_lr, f"must be <= optim.lr={lr} (the LR decays to it)"))
    try:
        parse_crash(str(_get(cfg, "train.fault.crash")))
    except ValueError as exc:
        errors.append(ConfigError("train.fault.crash", _get(cfg, "train.fault.crash"), str(exc)))
    families = [f.strip() for f in str(_get(cfg, "data.embedded.families") or "").split(",") if f.strip()]
    unknown = [f for f in families if f not in TASKS]
    if unknown:
        errors.append(ConfigError("data.embedded.families", _get(cfg, "data.embedded.families"),
                                  f"unknown {', '.join(unknown)}; known: {', '.join(TASKS)}"))
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
    for rank_key, armed in (("nan_grad_rank", "nan_grad_step"), ("crash_rank", "crash")):
        fault_rank = _get(cfg, f"train.fault.{rank_key}")
        if (_get(cfg, f"train.fault.{armed}") not in (0, "", "none") and isinstance(fault_rank, int)
                and fault_rank >= world):
            errors.append(ConfigError(f"train.fault.{rank_key}", fault_rank, f"must be a rank < {world_text}"))
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


def _data_problem(cfg: DictConfig, raw: str) -> Optional[str]:
    """A chat format's data.path: it exists here (never a hub name: the message says how to
    download it elsewhere), is readable, and its head parses as data.format (data.format=auto:
    as the shape its first record has, which the stage must read)."""
    path = Path(raw).expanduser()
    if why := missing_path_problem(raw) or (_missing_file(raw) if path.is_file() else None):
        return why
    fmt, cols = str(cfg.data.format), columns_of(cfg)
    if fmt == "auto":
        try:
            fmt = detect_format(path, cols)
        except (ValueError, OSError) as err:
            return str(err)
        stage = cfg.stage.name
        if stage in STAGE_DATA and fmt not in STAGE_DATA[stage]:
            return (f"data.format=auto: its records are {fmt} data, and stage={stage} reads one of "
                    f"{', '.join(STAGE_DATA[stage])}")
    return sniff(fmt, path, columns=cols)


def _check_stage(cfg: DictConfig) -> list[ConfigError]:
    """The stage against its data, model head, inputs and hyperparameter ranges."""
    stage, fmt = cfg.stage.name, cfg.data.format
    errors = []
    if fmt not in STAGE_DATA[stage]:
        errors.append(ConfigError("data.format", fmt, f"stage={stage} reads one of {', '.join(STAGE_DATA[stage])}"))
    head, why = STAGE_HEAD.get(stage, "lm"), ""
    if stage == "rm" and _get(cfg, "rm.score") == "logprob":
        head, why = "lm", " with rm.score=logprob (the reward is the LM's log-prob of the response)"
    if cfg.model.head != head:
        errors.append(ConfigError("model.head", cfg.model.head, f"stage={stage} needs model.head={head}{why}"))
    if stage == "rm":
        score, reduce = _get(cfg, "rm.score"), _get(cfg, "rm.reduce")
        allowed = {"value": ("last", "mean"), "logprob": ("sum", "mean")}.get(score, ())
        if allowed and reduce not in allowed:
            errors.append(ConfigError("rm.reduce", reduce, f"with rm.score={score} must be one of {', '.join(allowed)}"))
    new, seq = _get(cfg, "sampling.max_new_tokens"), _get(cfg, "model.seq_length")
    if stage in SAMPLING_STAGES and isinstance(new, int) and isinstance(seq, int) and new >= seq:
        errors.append(ConfigError("sampling.max_new_tokens", new,
                                  f"stage={stage} needs room for the prompt: must be < model.seq_length={seq}"))
    if stage in SAMPLING_STAGES:
        for key, what in (("ckpt.load", "the policy to sample from"),
                          ("best_of_n.reward", "the reward model's run dir")):
            if not _get(cfg, key):
                errors.append(ConfigError(key, _get(cfg, key), f"stage={stage} needs {what}"))
    ranges = (("dpo.beta", lambda v: v > 0, "must be > 0"),
              ("dpo.label_smoothing", lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
              ("rm.beta", lambda v: v > 0, "must be > 0"),
              ("data.embedded.flip", lambda v: 0 <= v < 1, "must be in [0, 1)"),
              ("data.embedded.same_style", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
              ("sampling.temperature", lambda v: v >= 0, "must be >= 0 (0 is greedy)"),
              ("sampling.top_p", lambda v: 0 < v <= 1, "must be in (0, 1]"),
              ("sampling.top_k", lambda v: v >= 0, "must be >= 0 (0 is off)"),
              )
    for key, ok, what in ranges:
        value = _get(cfg, key)
        if not ok(value):
            errors.append(ConfigError(key, value, what))
    return errors


def _check_rl(cfg: DictConfig) -> list[ConfigError]:
    """The RL stages' ppo.* settings (launcher/validate_rl.py); ppo.* ranges for every stage."""
    from launcher.validate_rl import check_ranges, check_rl

    return check_ranges(cfg) + (check_rl(cfg) if cfg.stage.name in RL_STAGES else [])


def _check_paths(cfg: DictConfig, pending: frozenset[str] = frozenset()) -> list[ConfigError]:
    """Inputs exist: data, tokenizer, checkpoints. `pending`: paths an earlier step of a
    recipe will write (they count as present)."""
    errors = []
    if cfg.data.format not in ("embedded", "text"):
        raw = cfg.data.path or ""
        why = _data_problem(cfg, raw) if raw else \
            f"data.format={cfg.data.format} needs data.path=<file or directory>"
        if why:
            errors.append(ConfigError("data.path", raw, why))
    if cfg.data.format == "text":
        raw = cfg.data.path or ""
        parts = [part.strip() for part in raw.split(",")]
        if not raw.strip() or not all(parts):
            errors.append(ConfigError(
                "data.path", raw, "data.format=text needs data.path=<file>[,<file>...]"))
        elif len(parts) == 1 and not has_text_files(raw):  # a data set's `text` column
            if why := missing_path_problem(raw) or sniff("text", Path(raw).expanduser(), columns=columns_of(cfg)):
                errors.append(ConfigError("data.path", raw, why))
        else:
            problems = [_missing_file(part) or sniff("text", Path(part).expanduser()) for part in parts]
            if any(problems):
                errors.append(ConfigError("data.path", raw, "; ".join(p for p in problems if p)))
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


def find_errors(cfg: DictConfig | Any, pending: frozenset[str] = frozenset(),
                device: bool = True) -> list[ConfigError]:
    """Every problem in `cfg` (a composed DictConfig or a chatforge_config.trainer.Config), in order.
    `pending`: paths that do not exist yet but will (a recipe's earlier steps write them).
    `device`: check that cluster=local's ranks can run on this machine's devices (not for
    `chatforge plan`, which may describe a run for another machine)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    errors = _check_choices(cfg) + _check_positive(cfg)
    # Arithmetic on a value already reported as bad would only repeat (or crash on) it.
    dependent: list[tuple[Callable[[DictConfig], list[ConfigError]], tuple[str, ...]]] = [
        (_check_layout, LAYOUT_KEYS),
        (lambda c: _check_paths(c, pending), ("data.format",)),
        (_check_stage, ("stage.name", "data.format", "model.head")),
        (_check_memory_savers, ("stage.name", "optim.name")),
        (_check_rl, ("stage.name", "ppo.rollout_batch", "ppo.n_samples_per_prompt", "sampling.max_new_tokens",
                     "model.seq_length", "ppo.advantage_estimator", "ppo.critic_init") + LAYOUT_KEYS),
    ]
    for check, needs in dependent:
        if not _bad_keys(errors) & set(needs):
            errors.extend(check(cfg))
    if not _bad_keys(errors) & {"stage.name", "data.format", "data.path", "data.embedded.num_docs"}:
        errors.extend(ConfigError(*problem) for problem in check_tokenizer(cfg))
    # The device check estimates memory from the model, layout, batch, LoRA and optimizer:
    # it runs on an otherwise valid config only.
    if device and not errors:
        errors.extend(ConfigError(*problem) for problem in check_local_device(cfg))
    if "cluster.name" not in _bad_keys(errors):
        errors.extend(find_cluster_errors(cfg, layout_ok=not _bad_keys(errors) & set(LAYOUT_KEYS)))
    return errors


def validate(cfg: DictConfig | Any) -> None:
    """Raise the first ConfigError in `cfg`; return quietly when it is runnable."""
    errors = find_errors(cfg)
    if errors:
        raise errors[0]
