"""Who stops the dev Slurm cluster after a test session (tests/slurm/lease.py), with stand-in
start/stop commands that write and remove pid files naming real processes; the real scripts
run in tests/slurm/test_cluster.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.slurm.lease import ClusterLease, live_daemons, pid_alive


@pytest.fixture
def daemon() -> Iterator[subprocess.Popen]:
    """A live process to stand for slurmctld."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def _lease(base: Path, daemon: subprocess.Popen, session: int) -> ClusterLease:
    pids, log = base / "pids", base / "calls.log"
    ctld = pids / "slurmctld.pid"  # like start.sh, starts only what does not run
    start = (f"mkdir -p {pids} && {{ [ -s {ctld} ] || echo {daemon.pid} > {ctld}; }} "
             f"&& echo start >> {log}")
    stop = f"rm -f {pids}/*.pid && echo stop >> {log}"
    return ClusterLease(base, start=("bash", "-c", start), stop=("bash", "-c", stop),
                        session=session)


def _calls(base: Path) -> list[str]:
    path = base / "calls.log"
    return path.read_text().split() if path.exists() else []


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_live_daemons_reads_pid_files(tmp_path: Path, daemon: subprocess.Popen) -> None:
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / "slurmctld.pid").write_text(f"{daemon.pid}\n")
    (tmp_path / "pids" / "munged.pid").write_text(f"{_dead_pid()}\n")
    (tmp_path / "pids" / "slurmd.n1.pid").write_text("")
    assert live_daemons(tmp_path) == ["slurmctld"]
    assert live_daemons(tmp_path / "nothing") == []
    assert pid_alive(daemon.pid) and not pid_alive(_dead_pid())


def test_a_session_that_started_the_cluster_stops_it(tmp_path: Path,
                                                     daemon: subprocess.Popen) -> None:
    lease = _lease(tmp_path, daemon, session=daemon.pid)
    assert lease.acquire().returncode == 0
    assert live_daemons(tmp_path) == ["slurmctld"]
    assert lease.release() is True
    assert _calls(tmp_path) == ["start", "stop"] and live_daemons(tmp_path) == []


def test_a_cluster_found_running_is_left_alone(tmp_path: Path, daemon: subprocess.Popen) -> None:
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / "slurmctld.pid").write_text(f"{daemon.pid}\n")  # started by hand
    lease = _lease(tmp_path, daemon, session=daemon.pid)
    assert lease.acquire().returncode == 0
    assert lease.release() is False
    assert _calls(tmp_path) == ["start"] and live_daemons(tmp_path) == ["slurmctld"]


def test_the_last_session_out_stops_it(tmp_path: Path, daemon: subprocess.Popen) -> None:
    """Two sessions overlap: the one that started the cluster ends first and must not stop it
    under the other's tests; the other, ending last, stops it."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        first, second = _lease(tmp_path, daemon, daemon.pid), _lease(tmp_path, daemon, other.pid)
        first.acquire()
        second.acquire()
        assert first.release() is False and live_daemons(tmp_path) == ["slurmctld"]
        assert second.release() is True and live_daemons(tmp_path) == []
        assert _calls(tmp_path) == ["start", "start", "stop"]
    finally:
        other.kill()
        other.wait()


def test_a_crashed_session_does_not_keep_it_running(tmp_path: Path,
                                                    daemon: subprocess.Popen) -> None:
    crashed = _lease(tmp_path, daemon, _dead_pid())
    crashed.acquire()  # started it, then died without releasing
    later = _lease(tmp_path, daemon, daemon.pid)
    later.acquire()
    assert later.release() is True
    assert _calls(tmp_path) == ["start", "start", "stop"] and live_daemons(tmp_path) == []


def test_a_cluster_restarted_by_hand_after_a_crash_is_left_alone(
        tmp_path: Path, daemon: subprocess.Popen) -> None:
    """A crashed session's marker names the slurmctld it started; someone then stopped that
    cluster and started their own by hand: the next session must not stop theirs."""
    crashed = _lease(tmp_path, daemon, _dead_pid())
    crashed.acquire()
    theirs = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (tmp_path / "pids" / "slurmctld.pid").write_text(f"{theirs.pid}\n")  # stop.sh; start.sh
        later = _lease(tmp_path, daemon, daemon.pid)
        later.acquire()
        assert later.release() is False
        assert _calls(tmp_path) == ["start", "start"] and live_daemons(tmp_path) == ["slurmctld"]
    finally:
        theirs.kill()
        theirs.wait()
