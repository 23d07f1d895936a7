"""Checks of what the run will meet once started, made before it starts: the tokenizer it
trains fits its text, the precision fits the device the ranks run on; and warnings for
settings that are legal but surely unintended. Torch-free (launcher/devices.py)."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from launcher.devices import BF16_DEVICES, BF16_MIN_CAPABILITY, Gpu, local_gpus
from trainer.data.sources import has_text_files
from trainer.data.tokenizer import MIN_VOCAB_SIZE, NUM_BYTE_PIECES, NUM_SPECIAL, min_vocab_for

# Stages that train a tokenizer when tokenizer.path is empty even with ckpt.load set; the
# others take the checkpoint's (trainer/data/chat_prepare.resolve_tokenizer).
OWN_TOKENIZER_STAGES = ("pretrain", "tokenizer")
# Above this many embedded documents the character count is skipped (it generates them).
CHAR_SCAN_DOCS = 20000
CHAR_SCAN_BYTES = 1 << 20
EMBEDDED_ALPHABET = frozenset(chr(c) for c in range(32, 127))  # what trainer/data/corpus.py writes


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def _trains_tokenizer(cfg: DictConfig) -> bool:
    if _get(cfg, "tokenizer.path"):
        return False
    return _get(cfg, "stage.name") in OWN_TOKENIZER_STAGES or not _get(cfg, "ckpt.load")


@functools.lru_cache(maxsize=4)
def _embedded_corpus(num_docs: int, seed: int) -> tuple[str, ...]:
    from trainer.data.corpus import generate_corpus

    return tuple(generate_corpus(num_docs, seed))


def _training_text(cfg: DictConfig) -> list[str]:
    """What the tokenizer of a pretrain/tokenizer run trains on, or a head of it (a lower
    bound on its characters); [] where it is not cheap to know or cannot matter."""
    fmt, vocab = _get(cfg, "data.format"), _get(cfg, "tokenizer.vocab_size")
    if fmt == "embedded":
        # Its text is printable ASCII (tested): a vocabulary with room for all of it is
        # enough without generating it (a fifth of a second per point).
        if vocab >= NUM_SPECIAL + NUM_BYTE_PIECES + len(EMBEDDED_ALPHABET):
            return []
        if _get(cfg, "data.embedded.num_docs") <= CHAR_SCAN_DOCS:
            return list(_embedded_corpus(int(cfg.data.embedded.num_docs), int(cfg.data.embedded.seed)))
        return []
    if fmt == "text":
        if not has_text_files(str(_get(cfg, "data.path"))):
            return []  # a data set's column: read on rank 0 (trainer/data/prepare.py)
        texts = []
        for part in str(_get(cfg, "data.path")).split(","):
            with open(Path(part.strip()).expanduser(), "rb") as handle:
                texts.append(handle.read(CHAR_SCAN_BYTES).decode("utf-8", errors="ignore"))
        return texts
    return []


def check_tokenizer(cfg: DictConfig) -> list[tuple[str, Any, str]]:
    """A tokenizer the run will train must hold the special tokens, the byte pieces and one
    piece per character of its text (sentencepiece refuses otherwise, on a rank)."""
    if not _trains_tokenizer(cfg):
        return []
    vocab, coverage = _get(cfg, "tokenizer.vocab_size"), _get(cfg, "tokenizer.character_coverage")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < MIN_VOCAB_SIZE:
        return [("tokenizer.vocab_size", vocab,
                 f"too small for a trained tokenizer: {NUM_SPECIAL} special tokens and "
                 f"{NUM_BYTE_PIECES} byte-fallback pieces need at least {MIN_VOCAB_SIZE}")]
    if not isinstance(coverage, (int, float)) or not 0 < coverage <= 1:
        return [("tokenizer.character_coverage", coverage, "must be in (0, 1]")]
    if coverage < 1 or _get(cfg, "stage.name") not in OWN_TOKENIZER_STAGES:
        return []
    chars, need = min_vocab_for(_training_text(cfg))
    if vocab < need:
        return [("tokenizer.vocab_size", vocab,
                 f"too small for this data: its {chars} distinct characters each need a piece besides "
                 f"the {NUM_SPECIAL + NUM_BYTE_PIECES} special and byte pieces, so at least {need} "
                 f"(or lower tokenizer.character_coverage)")]
    return []


@functools.lru_cache(maxsize=1)
def _gpus_here() -> tuple[Gpu, ...]:
    return tuple(local_gpus())


def check_local_device(cfg: DictConfig) -> list[tuple[str, Any, str]]:
    """cluster=local runs every rank on this machine: its GPUs (if any: then NCCL, one GPU per
    rank) must run the precision asked for."""
    if _get(cfg, "cluster.name") != "local":
        return []
    gpus, bf16 = _gpus_here(), _get(cfg, "parallel.precision") == "bf16"
    ppn = _get(cfg, "cluster.procs_per_node")
    if bf16 and not gpus:
        return [("parallel.precision", "bf16",
                 f"cluster=local runs the ranks on this machine, which has no GPU (its CPU runs fp32 "
                 f"only); bf16 needs {BF16_DEVICES}: use parallel.precision=fp32 here, or cluster=slurm "
                 f"with cluster.gpus_per_node on such GPUs")]
    old = [gpu for gpu in gpus if gpu.capability is not None and gpu.capability < BF16_MIN_CAPABILITY]
    if bf16 and old:
        return [("parallel.precision", "bf16",
                 f"this machine's {old[0].name} (compute capability {old[0].capability}) has no native "
                 f"bf16; {BF16_DEVICES} would: use parallel.precision=fp32 here")]
    if gpus and isinstance(ppn, int) and ppn > len(gpus):
        return [("cluster.procs_per_node", ppn,
                 f"this machine has {len(gpus)} GPU(s) ({gpus[0].name}) and each rank needs its own "
                 f"(NCCL): use at most {len(gpus)}, or CUDA_VISIBLE_DEVICES= to run every rank on the CPU")]
    return [] if gpus else _check_host_memory(cfg)


def _host_memory() -> int:
    """Bytes of physical memory on this machine (0 if unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _check_host_memory(cfg: DictConfig) -> list[tuple[str, Any, str]]:
    """CPU ranks on this machine: `chatforge plan`'s estimate for all of them must fit its
    memory (a model that cannot is otherwise found by the kernel's OOM killer, or a hang)."""
    from launcher.plan import GB, memory_per_device

    have, ppn = _host_memory(), int(cfg.cluster.procs_per_node)
    need = memory_per_device(cfg).total * ppn
    if not have or need <= have:
        return []
    m = cfg.model
    return [("model", m.name, f"{ppn} rank(s) of this model need about {need / GB:,.1f} GB "
             f"(model.num_layers={m.num_layers}, model.hidden_size={m.hidden_size}, model.seq_length="
             f"{m.seq_length}, train.micro_batch={cfg.train.micro_batch}; `chatforge plan` has the "
             f"parts) and this machine has {have / GB:,.1f} GB: choose a smaller model or run on a cluster")]


# Keys that may change when the same run is continued (longer, elsewhere, other limits).
CONTINUABLE = ("run.", "cluster.", "train.steps", "train.max_minutes", "train.exit_interval",
               "train.fault.", "train.max_bad_steps", "ckpt.", "logger", "wandb.", "data.path",
               "tokenizer.path", "recipe.")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _other_run(cfg: DictConfig, run_dir: Path) -> list[str]:
    """A run dir that already holds a run with other settings: this one would resume from
    its checkpoints (what happens when a new sweep reuses an old sweep's run.dir)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return []
    try:
        there = _flat(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    except Exception:  # a damaged file is the trainer's to report
        return []
    here = _flat(OmegaConf.to_container(cfg, resolve=True))
    changed = [key for key in sorted(set(here) & set(there))
               if here[key] != there[key] and not key.startswith(CONTINUABLE)]
    if not changed:
        return []
    shown = ", ".join(f"{key}: {there[key]} there, {here[key]} here" for key in changed[:3])
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return [f"run.dir={run_dir}: already holds a run with other settings ({shown}{more}); "
            f"this run continues from its checkpoints: use a new run.dir for a new run"]


def find_warnings(cfg: DictConfig, run_dir: Path) -> list[str]:
    """Settings that are legal but surely unintended, one line each (`key=value: why`)."""
    steps = _get(cfg, "train.steps")
    warnings = _other_run(cfg, run_dir)
    if _get(cfg, "stage.name") in ("best_of_n", "eval", "tokenizer"):
        return warnings  # no training steps
    warmup, every = _get(cfg, "optim.warmup_steps"), _get(cfg, "ckpt.every")
    decay = _get(cfg, "optim.decay_steps") or steps
    if warmup > decay:
        warnings.append(f"optim.warmup_steps={warmup}: longer than the run (train.steps={steps}); "
                        f"the learning rate never reaches optim.lr (the schedule caps warmup at "
                        f"{max(decay - 1, 0)} steps)")
    if every > steps:
        warnings.append(f"ckpt.every={every}: longer than the run (train.steps={steps}); only the "
                        f"final checkpoint is written")
    return warnings
