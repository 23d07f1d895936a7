"""The real Slurm dev cluster (slurm/start.sh) for the tests in this directory.

Started here when it is not running (idempotent, ~1 s when it is), so these tests run, not
skip, wherever the machine allows root and namespaces; nothing mocks sbatch. Stopped again when
the session ends if a test session started it and no other session still uses it; a cluster
that was already running (started by hand or by `.ci/run`) is left alone (tests/slurm/lease.py).
Every test in this directory is marked `slurm`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.slurm.lease import ClusterLease

REPO = Path(__file__).resolve().parents[2]
CHATFORGE = Path(sys.executable).parent / "chatforge"
BASE = Path(os.environ.get("CHATFORGE_SLURM_DIR", "/tmp/chatforge-slurm"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment for client commands: the cluster's wrappers first on PATH, and a private
    job index. Starts the cluster if needed; stops it at the end if this session started it."""
    lease = ClusterLease(BASE)
    proc = lease.acquire()
    env = {"PATH": f"{BASE / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_CONF": str(BASE / "etc" / "slurm.conf"),
           "CHATFORGE_HOME": str(tmp_path_factory.mktemp("chatforge-home"))}
    saved = {key: os.environ.get(key) for key in env}
    try:
        assert proc.returncode == 0, f"slurm/start.sh failed:\n{proc.stdout}\n{proc.stderr}"
        os.environ.update(env)  # for launcher code called in this process (submitit, states)
        yield {**os.environ, **env}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        lease.release()


def chatforge(args: list[str], env: dict[str, str], cwd: Path,
              timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHATFORGE), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; on a resumed run the last record of a step wins."""
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
