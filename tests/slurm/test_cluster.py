"""The dev cluster itself: a second start changes nothing; nodes are separate hosts."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.slurm.conftest import BASE, REPO


def _pids() -> dict[str, str]:
    return {p.name: p.read_text().strip() for p in sorted((BASE / "pids").glob("*.pid"))}


def test_start_is_idempotent(slurm_env: dict[str, str]) -> None:
    before = _pids()
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "slurm/start.sh")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 30
    assert _pids() == before and len(before) >= 6  # munged, mariadbd, slurmdbd, ctld, 2 x slurmd
    assert f"source {BASE}/env.sh" in proc.stdout


def test_nodes_have_their_own_hostname_and_address(slurm_env: dict[str, str]) -> None:
    out = subprocess.run(["srun", "-N2", "--ntasks-per-node=1", "-l", "sh", "-c",
                          "echo $(hostname) $(getent hosts $(hostname) | cut -d' ' -f1)"],
                         env=slurm_env, capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    rows = sorted(line.split(": ", 1)[1].split() for line in out.stdout.strip().splitlines())
    net = os.environ.get("CHATFORGE_SLURM_NET", "10.200.0")
    assert rows == [["n1", f"{net}.11"], ["n2", f"{net}.12"]], out.stdout
    assert Path(f"/run/netns/{os.environ.get('CHATFORGE_SLURM_NS', 'cfslurm')}-n1").exists()
