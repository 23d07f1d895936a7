"""The dev cluster itself: a second start changes nothing; nodes are separate hosts; a test
session stops the cluster it started and leaves alone one it found running."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.slurm.conftest import BASE, REPO
from tests.slurm.lease import live_daemons


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


def test_a_session_stops_the_cluster_it_started_and_leaves_a_running_one_alone() -> None:
    """Two real pytest sessions (one test each) on a private cluster (own directory,
    namespaces and addresses, so the suite's own cluster is untouched): the first finds
    nothing and must leave nothing running; the second finds a cluster started by hand and
    must leave its daemons (the same processes) running."""
    base = Path(tempfile.mkdtemp(prefix="cfslurm-life-", dir="/tmp"))  # short: socket paths
    ns = f"cfl{os.getpid() % 100000}"  # two suites at once get two (veth names: <= 15 chars)
    env = {**os.environ, "CHATFORGE_SLURM_DIR": str(base), "CHATFORGE_SLURM_NS": ns,
           "CHATFORGE_SLURM_NET": "10.201.0", "CHATFORGE_SLURM_NODES": "2"}
    env.pop("SLURM_CONF", None)
    script = {name: str(REPO / "slurm" / f"{name}.sh") for name in ("start", "stop")}

    def session() -> None:  # test_start_is_idempotent asserts that all 6 daemons run
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"{__file__}::test_start_is_idempotent"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-4000:]

    try:
        session()
        assert live_daemons(base) == [], "the session left the cluster it started running"
        start = subprocess.run(["bash", script["start"]], env=env, capture_output=True,
                               text=True, timeout=600)
        assert start.returncode == 0, start.stderr
        pids = {p.name: p.read_text() for p in (base / "pids").glob("*.pid")}
        session()
        assert len(live_daemons(base)) == 6, "the session stopped a cluster it found running"
        assert {p.name: p.read_text() for p in (base / "pids").glob("*.pid")} == pids
    finally:
        subprocess.run(["bash", script["stop"], "--purge"], env=env, capture_output=True,
                       timeout=120)
        shutil.rmtree(base, ignore_errors=True)
