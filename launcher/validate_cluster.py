"""Checks of the cluster keys and the run directory, before anything is submitted.

Separate from validate.py (model/parallel/data rules) because these depend on where the job
runs: SLURM options that reach sbatch/srun, the run directory every node must write, and
memory per device against the hardware described in cluster.*.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from launcher.errors import ConfigError

# sbatch options the launcher sets itself from cluster.* keys (or that would break the job);
# sbatch_extra must not set them behind the launcher's back.
OWNED_SBATCH = {
    "nodes": "cluster.nodes", "ntasks-per-node": "cluster.procs_per_node",
    "ntasks": "cluster.procs_per_node", "gpus-per-node": "cluster.gpus_per_node",
    "cpus-per-task": "cluster.cpus_per_task", "mem": "cluster.mem_gb",
    "time": "cluster.time_min", "partition": "cluster.partition", "account": "cluster.account",
    "qos": "cluster.qos", "constraint": "cluster.constraint", "exclusive": "cluster.exclusive",
    "job-name": "cluster.job_name", "signal": "cluster.signal_seconds",
    "dependency": "recipe= (a recipe chains its steps' jobs)", "kill-on-invalid-dep": "recipe=",
    "output": "run.dir", "error": "run.dir", "array": "-m (sweeps)",
}
# Free-text values that end up on an #SBATCH line or an srun argument: quoted by the
# launcher, but a control character (newline) would still end the #SBATCH line.
TEXT_KEYS = ("cluster.partition", "cluster.account", "cluster.qos", "cluster.constraint",
             "cluster.job_name", "cluster.container_image", "cluster.container_mounts")
# Keys that become #SBATCH lines. sbatch reads those with its own parser, not a shell: a
# backslash escapes the next character even inside quotes, so the POSIX quoting submitit
# writes loses it (seen on the dev cluster: the job's name arrived without it).
SBATCH_LINE_KEYS = ("cluster.partition", "cluster.account", "cluster.qos", "cluster.constraint",
                    "cluster.job_name")
SBATCH_BACKSLASH = ("must not contain a backslash: sbatch reads #SBATCH lines with its own parser, "
                    "which drops it")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_OPTION = re.compile(r"^[a-z][a-z0-9-]*$")


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_numbers(cfg: DictConfig) -> list[ConfigError]:
    errors = []
    for key, low in (("cluster.gpus_per_node", 0), ("cluster.time_min", 1),
                     ("cluster.signal_seconds", 0), ("cluster.max_requeues", 0)):
        value = _get(cfg, key)
        if not _is_int(value) or value < low:
            errors.append(ConfigError(key, value, f"must be an integer >= {low}"))
    cpus = _get(cfg, "cluster.cpus_per_task")
    if cpus is not None and (not _is_int(cpus) or cpus < 1):
        errors.append(ConfigError("cluster.cpus_per_task", cpus, "must be null or an integer >= 1"))
    mem = _get(cfg, "cluster.mem_gb")
    if mem is not None and (not isinstance(mem, (int, float)) or mem <= 0):
        errors.append(ConfigError("cluster.mem_gb", mem, "must be null or > 0"))
    for key in ("cluster.gpu_memory_gb", "cluster.peak_tflops"):
        if not _get(cfg, key) > 0:
            errors.append(ConfigError(key, _get(cfg, key), "must be > 0"))
    mfu = _get(cfg, "cluster.mfu")
    if not 0 < mfu <= 1:
        errors.append(ConfigError("cluster.mfu", mfu, "must be in (0, 1]"))
    if _get(cfg, "cluster.price_per_gpu_hour") < 0:
        errors.append(ConfigError("cluster.price_per_gpu_hour",
                                  _get(cfg, "cluster.price_per_gpu_hour"), "must be >= 0"))
    return errors


def _check_slurm_sizes(cfg: DictConfig) -> list[ConfigError]:
    errors = []
    gpus, ppn = _get(cfg, "cluster.gpus_per_node"), _get(cfg, "cluster.procs_per_node")
    if gpus > 0 and ppn != gpus:
        errors.append(ConfigError("cluster.procs_per_node", ppn,
                                  f"must equal cluster.gpus_per_node={gpus} (one rank per GPU)"))
    if gpus == 0 and _get(cfg, "parallel.precision") == "bf16":
        errors.append(ConfigError("parallel.precision", "bf16",
                                  "needs GPUs: set cluster.gpus_per_node (CPU ranks run fp32)"))
    cpus, threads = _get(cfg, "cluster.cpus_per_task"), _get(cfg, "cluster.threads_per_proc")
    if cpus is not None and _is_int(threads) and threads > cpus:
        errors.append(ConfigError("cluster.threads_per_proc", threads,
                                  f"must be <= cluster.cpus_per_task={cpus}"))
    signal_s, time_min = _get(cfg, "cluster.signal_seconds"), _get(cfg, "cluster.time_min")
    if signal_s >= time_min * 60:
        errors.append(ConfigError("cluster.signal_seconds", signal_s,
                                  f"must be shorter than cluster.time_min={time_min} minutes"))
    return errors


def _check_text(cfg: DictConfig) -> list[ConfigError]:
    errors = []
    for key in TEXT_KEYS:
        value = _get(cfg, key)
        if value is None:
            continue
        if key != "cluster.job_name" and value == "":
            errors.append(ConfigError(key, value, "must be null (unset) or non-empty"))
        elif _CONTROL.search(str(value)):
            errors.append(ConfigError(key, repr(value), "must not contain control characters"))
        elif "\\" in str(value) and key in SBATCH_LINE_KEYS:
            errors.append(ConfigError(key, value, SBATCH_BACKSLASH))
    for option, value in (_get(cfg, "cluster.sbatch_extra") or {}).items():
        key = f"cluster.sbatch_extra.{option}"
        if not _OPTION.match(str(option)):
            errors.append(ConfigError(key, value, "option names are lowercase words with dashes, "
                                                  "without the leading --"))
        elif option in OWNED_SBATCH:
            errors.append(ConfigError(key, value, f"set by the launcher; use {OWNED_SBATCH[option]}"))
        elif _CONTROL.search(str(value)):
            errors.append(ConfigError(key, repr(value), "must not contain control characters"))
        elif "\\" in str(value):
            errors.append(ConfigError(key, value, SBATCH_BACKSLASH))
    for index, arg in enumerate(_get(cfg, "cluster.srun_extra") or []):
        key = f"cluster.srun_extra[{index}]"
        if not str(arg).startswith("-") or _CONTROL.search(str(arg)):
            errors.append(ConfigError(key, repr(arg), "must be one option such as --cpu-bind=cores"))
    return errors


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _creatable(existing: Path, path: Path) -> Optional[str]:
    """Why `path` cannot be made under its nearest existing parent, asked of the filesystem
    itself (os.access cannot tell root about /proc, a read-only mount or a name too long):
    the missing part is made inside a fresh temporary directory that is removed at once."""
    try:
        probe = Path(tempfile.mkdtemp(prefix=".chatforge-probe-", dir=existing))
    except OSError as err:
        return f"cannot create anything in {existing}: {err.strerror}"
    try:
        missing = path.relative_to(existing)
        if missing.parts:
            (probe / missing).mkdir(parents=True)
    except OSError as err:
        return f"cannot be created: {err.strerror}"
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return None


def run_dir_problem(run_dir: str, node_local: Optional[list[str]]) -> Optional[str]:
    """Why the launcher (and, for SLURM, every node) could not write `run_dir`, or None."""
    if _CONTROL.search(run_dir):
        return "must not contain control characters"
    if not run_dir.strip():
        return "must name a directory (empty would fill the current directory with run files)"
    path = Path(run_dir).expanduser().absolute()
    existing = _nearest_existing(path)
    if existing == path and not path.is_dir():
        return f"exists and is not a directory: {path}"
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"not writable: {existing}"
    for prefix in node_local or []:
        if path == Path(prefix) or Path(prefix) in path.parents:
            return (f"is under {prefix}, which is node-local on most clusters; put runs on a "
                    f"shared filesystem (or set cluster.node_local_prefixes=[] if {prefix} "
                    f"is shared)")
    return _creatable(existing, path)


def _check_memory(cfg: DictConfig) -> list[ConfigError]:
    from launcher.plan import GB, memory_per_device

    mem = memory_per_device(cfg)
    parts = (f"weights {mem.weights / GB:.1f} + grads {mem.grads / GB:.1f} + optimizer "
             f"{mem.optimizer / GB:.1f} + activations {mem.activations[mem.recompute] / GB:.1f} GB")
    advice = ("raise parallel.tp or parallel.pp, set parallel.distributed_optimizer=true or "
              "parallel.recompute=selective|full, or lower train.micro_batch")
    gpus = _get(cfg, "cluster.gpus_per_node")
    if gpus > 0 and mem.total > cfg.cluster.gpu_memory_gb * GB:
        return [ConfigError("cluster.gpu_memory_gb", cfg.cluster.gpu_memory_gb,
                            f"the estimate is {mem.total / GB:.1f} GB per device ({parts}); {advice}")]
    mem_gb = _get(cfg, "cluster.mem_gb")
    per_node = mem.total * cfg.cluster.procs_per_node
    if gpus == 0 and mem_gb is not None and per_node > mem_gb * GB:
        return [ConfigError("cluster.mem_gb", mem_gb,
                            f"the estimate is {per_node / GB:.1f} GB per node "
                            f"({cfg.cluster.procs_per_node} ranks x {mem.total / GB:.1f} GB: "
                            f"{parts}); {advice}")]
    return []


def find_cluster_errors(cfg: DictConfig, layout_ok: bool) -> list[ConfigError]:
    """Cluster and run-dir problems; the SLURM ones only for cluster=slurm. `layout_ok`: the
    parallel layout passed (the memory estimate divides by it)."""
    errors: list[ConfigError] = []
    slurm = _get(cfg, "cluster.name") == "slurm"
    node_local = list(_get(cfg, "cluster.node_local_prefixes") or []) if slurm else []
    why = run_dir_problem(str(_get(cfg, "run.dir")), node_local)
    if why:
        errors.append(ConfigError("run.dir", _get(cfg, "run.dir"), why))
    numbers = _check_numbers(cfg)
    errors += numbers
    if not slurm:
        return errors
    if shutil.which("sbatch") is None:
        errors.append(ConfigError("cluster.name", "slurm", "sbatch is not on PATH (on the dev "
                                  "cluster: source /tmp/chatforge-slurm/env.sh)"))
    errors += _check_text(cfg)
    if "\\" in str(_get(cfg, "run.dir")):  # --output=<run.dir>/logs/slurm/... is an #SBATCH line
        errors.append(ConfigError("run.dir", _get(cfg, "run.dir"), SBATCH_BACKSLASH))
    if not numbers:
        errors += _check_slurm_sizes(cfg)
        if layout_ok:
            errors += _check_memory(cfg)
    return errors
