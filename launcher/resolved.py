"""The seam between launcher and trainer: the resolved config file in the run directory.

Every backend (local processes, a SLURM job, a recipe's chain of jobs) hands the trainer
this one file (`python -m trainer <run.dir>/config.yaml`), so it has one writer here, below
the command line (launcher/cli.py) and the backends that submit it (launcher/slurm.py).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict


def _absolute(paths: str) -> str:
    """Absolute form of a (comma-separated) path value: ranks may start elsewhere (srun)."""
    if not paths:
        return paths
    return ",".join(str(Path(p.strip()).expanduser().absolute()) for p in paths.split(","))


def write_resolved_config(cfg: DictConfig, run_dir: Path) -> Path:
    """Write `cfg`, resolved and with absolute paths, to <run_dir>/config.yaml atomically
    (a rank or a resumed run never reads half a file)."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.run.dir = str(run_dir.absolute())
        cfg.data.path = _absolute(cfg.data.path)
        cfg.tokenizer.path = _absolute(cfg.tokenizer.path)
        cfg.ckpt.load = _absolute(cfg.ckpt.load)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    tmp = run_dir / f".config.yaml.{os.getpid()}.tmp"
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, path)
    return path
