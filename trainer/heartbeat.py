"""Each rank's heartbeat: a small JSON file that the launcher's watchdog reads.

<run.dir>/logs/heartbeat/rank_N.json holds the rank, its host and pid, the last step it
finished, a beat counter, what it began next ("step", "eval", "save", "exit") and its memory
high-water mark. The training loop beats after each step and before each evaluation and save
(so that a stall inside one says so), steps at most once
a second per rank (a shared file system is not hammered by thousands of ranks stepping fast);
"exit" is beaten as the rank leaves the loop, so a rank that finished is not taken for a hung
one. Files, not a socket: the watchdog runs in the local launcher and in every SLURM task
wrapper, which share nothing but the run directory. Torch-free: the launcher reads these.
"""
from __future__ import annotations

import json
import os
import resource
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

MIN_INTERVAL_S = 1.0


def heartbeat_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "logs" / "heartbeat"


def heartbeat_path(run_dir: Path, rank: int) -> Path:
    return heartbeat_dir(run_dir) / f"rank_{rank}.json"


def memory_high_water_mb() -> Optional[float]:
    """This process's peak resident memory: VmHWM from /proc (Linux), else ru_maxrss."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if peak else None  # kB on Linux (bytes on macOS: close enough here)


@dataclass
class Beat:
    rank: int
    host: str
    pid: int
    step: int
    beat: int
    phase: str
    time: float
    max_rss_mb: Optional[float] = None

    def where(self) -> str:
        """'rank 1 on node7 (pid 123), last step 7' for the watchdog's messages (with what it
        began after that step when it was an evaluation or a save)."""
        doing = {"eval": " then evaluating", "save": " then saving"}.get(self.phase, "")
        memory = f", memory high-water mark {self.max_rss_mb:.0f} MiB" if self.max_rss_mb else ""
        return f"rank {self.rank} on {self.host} (pid {self.pid}), last step {self.step}{doing}{memory}"


def read_beat(path: Path) -> Optional[Beat]:
    """The beat in `path`, or None when there is none (yet) or it cannot be parsed."""
    try:
        return Beat(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


class Heartbeat:
    """The writer, one per rank."""

    def __init__(self, run_dir: Path, rank: int, min_interval_s: float = MIN_INTERVAL_S) -> None:
        self.path = heartbeat_path(run_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank, self.host, self.pid = rank, socket.gethostname(), os.getpid()
        self.min_interval_s = min_interval_s
        self.count = 0
        self._last = -float("inf")

    def beat(self, step: int, phase: str = "step", force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        self.count += 1
        record = Beat(self.rank, self.host, self.pid, step, self.count, phase, time.time(),
                      memory_high_water_mb())
        tmp = self.path.with_name(f".{self.path.name}.{self.pid}.tmp")
        try:
            tmp.write_text(json.dumps(asdict(record)))
            os.replace(tmp, self.path)  # a reader never sees half a beat
        except OSError:
            pass  # a full or flaky disk must not stop training; the watchdog will tell
