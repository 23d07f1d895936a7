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


@pytest.fixture(scope="session", autouse=True)
def trainer_zygote(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One zygote for the session (launcher.zygote.started): every local launch of `python -m
    trainer` (run_local, from this process or a `chatforge` subprocess) forks its ranks from
    a process that imported torch and megatron once, instead of importing them again per
    rank (about 6 s of CPU each, most of the suite's time on 2 cores). The exec path stays
    tested: test_zygote.py runs the same job both ways, and commands other than the trainer
    are always started by exec. A zygote that does not come up leaves the exec path on
    (yields None)."""
    import os
    import time

    from launcher.zygote import started

    log = tmp_path_factory.mktemp("zygote") / "zygote.log"
    with started(log) as sock:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not os.path.exists(sock):
            time.sleep(0.1)
        if not os.path.exists(sock):
            sys.stderr.write(f"trainer zygote did not start (ranks start by exec): {log.read_text()[-2000:]}\n")
        yield sock if os.path.exists(sock) else None
