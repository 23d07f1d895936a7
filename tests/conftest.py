"""Shared test helpers: where the repo and its test data live, and how to run the trainer
as several local processes (the launcher's own process spawner, gloo on CPU)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
# Small real data sets (tests/data/README.md: origin, size, licence), inside the repository
# so that any clone runs every test.
DATA = REPO / "tests" / "data"


def write_config(run_dir: Path, overrides: dict[str, Any]) -> Path:
    """A resolved trainer config (what the launcher writes), from the schema defaults."""
    from chatforge_config.trainer import Config

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(overrides))
    cfg.run.dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    OmegaConf.save(cfg, path, resolve=True)
    return path


def spawn_trainer(run_dir: Path, overrides: dict[str, Any], world_size: int = 1) -> int:
    """Run `python -m trainer` in `world_size` processes; return the job's exit code."""
    from launcher.local import run_local

    path = write_config(run_dir, overrides)
    return run_local([sys.executable, "-m", "trainer", str(path)], world_size, run_dir,
                     env_extra={"PYTHONPATH": str(REPO)}, threads=1)


def run_trainer(run_dir: Path, overrides: dict[str, Any], world_size: int = 1) -> list[dict[str, Any]]:
    """Run the trainer (it must succeed); return its metrics.jsonl records."""
    code = spawn_trainer(run_dir, overrides, world_size)
    assert code == 0, f"trainer failed with exit code {code}; see {run_dir}/logs"
    return read_metrics(run_dir)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"test data not found at {DATA} (tests/data/ is part of the repository)")
    return DATA
