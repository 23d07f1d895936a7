"""Who stops the dev Slurm cluster after a test session (tests/slurm/conftest.py's `slurm_env`).

A session that needs the cluster starts it (`slurm/start.sh`, idempotent) and, when it ends,
stops it (`slurm/stop.sh`) if a test session started it: a cluster someone started by hand
(or `.ci/run`) is left running. Several pytest sessions can share the cluster (several people
on one machine): each registers its pid under `<base>/test-sessions/`, and only the last live
one stops it, so a session never pulls the cluster from under another's running tests. A
marker file records that a test session started the cluster (and its slurmctld's pid); a
session that crashed leaves the marker and its dead pid, and the next session to end stops the
cluster it left, unless someone restarted it by hand meanwhile (another slurmctld).
"""
from __future__ import annotations

import fcntl
import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[2]


def pid_alive(pid: int) -> bool:
    """A process that exists and is not a zombie (PID 1 here reaps lazily, so a dead daemon can
    linger as one; slurm/start.sh's `alive` reads /proc/PID/stat for the same reason)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def live_daemons(base: Path) -> list[str]:
    """The daemons of slurm/start.sh (its pid files, `slurmctld`, `slurmd.n1`, ...) that run."""
    names = []
    for pidfile in sorted((base / "pids").glob("*.pid")):
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
        if pid_alive(pid):
            names.append(pidfile.stem)
    return names


@dataclass
class ClusterLease:
    """One test session's hold on the dev cluster under `base`. `start`/`stop` are the commands
    (slurm/start.sh and slurm/stop.sh by default); `session` is this session's pid."""

    base: Path
    start: tuple[str, ...] = ("bash", str(REPO / "slurm" / "start.sh"))
    stop: tuple[str, ...] = ("bash", str(REPO / "slurm" / "stop.sh"))
    session: int = field(default_factory=os.getpid)
    timeout: float = 900

    @property
    def _sessions(self) -> Path:
        return self.base / "test-sessions"

    @property
    def _marker(self) -> Path:
        return self._sessions / "started-by-tests"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Sessions take turns: a start or a stop never interleaves with another's."""
        self._sessions.mkdir(parents=True, exist_ok=True)
        with open(self.base / "test-sessions.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _ctld(self) -> str:
        """The pid in slurmctld's pid file ("" when there is none): which cluster runs."""
        try:
            return (self.base / "pids" / "slurmctld.pid").read_text().strip()
        except OSError:
            return ""

    def _others(self) -> list[int]:
        """The other live sessions; dead ones' files are removed."""
        others = []
        for path in self._sessions.glob("[0-9]*"):
            pid = int(path.name)
            if pid == self.session:
                continue
            if pid_alive(pid):
                others.append(pid)
            else:
                path.unlink(missing_ok=True)
        return others

    def acquire(self) -> subprocess.CompletedProcess:
        """Register this session and start the cluster (start.sh only starts what is not
        running). Returns start's result; the caller asserts on it."""
        with self._locked():
            fresh = not live_daemons(self.base)
            (self._sessions / str(self.session)).touch()
            proc = subprocess.run(list(self.start), capture_output=True, text=True,
                                  timeout=self.timeout)
            if fresh:  # nothing ran: this start is a test session's (a failed one too)
                self._marker.write_text(self._ctld())
            return proc

    def release(self) -> bool:
        """Unregister; stop the cluster if a test session started it and no other live session
        uses it. Returns whether it stopped it."""
        with self._locked():
            (self._sessions / str(self.session)).unlink(missing_ok=True)
            if not self._marker.exists() or self._others():
                return False
            if self._marker.read_text() != self._ctld():  # restarted by hand since: theirs
                self._marker.unlink()
                return False
            proc = subprocess.run(list(self.stop), capture_output=True, text=True,
                                  timeout=self.timeout)
            assert proc.returncode == 0, f"slurm/stop.sh failed:\n{proc.stdout}\n{proc.stderr}"
            self._marker.unlink(missing_ok=True)
            return True
