"""The hang watchdog: which rank of a job has made no progress for train.hang_timeout seconds.

Each rank writes <run.dir>/logs/heartbeat/rank_N.json after every step and before every
evaluation and save (trainer/heartbeat.py). The watchdog (in the local launcher and in every SLURM task
wrapper) reads those files and times progress on its own monotonic clock: a rank
progresses when its file changes, so clocks of other nodes never matter. The clock starts
at the job's first heartbeat (any rank's), not at launch: building a large model and its
first step may take long, and a rank stuck before its first step holds the others in the
first step's collectives, so they stop beating and the stall is found from there.

Files left by an earlier attempt (a resumed run) are taken as they are when the watchdog
starts and count only once they change. A rank that beat "exit" has left the loop and is no
longer watched; the local launcher also tells which ranks' processes are gone.
Torch-free.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from trainer.heartbeat import Beat, heartbeat_path, read_beat

READ_EVERY_S = 1.0  # file reads per rank: at most this often


def process_state(pid: int) -> str:
    """The kernel's one-letter state of a local process (R, S, D, T stopped, Z ...), or ""."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def descendants(pid: int) -> list[int]:
    """Every live descendant of a local process (from /proc), children first."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


@dataclass
class Stall:
    """A rank without progress: what the launcher says and acts on."""

    rank: int
    silent_s: float
    beat: Optional[Beat]  # its last heartbeat; None if it never beat
    state: str = ""  # its process state where the watcher can see it ("T": stopped)
    others: tuple[int, ...] = ()  # ranks silent as long (waiting for this one in a collective?)

    def message(self, timeout_s: float) -> str:
        who = self.beat.where() if self.beat else f"rank {self.rank} (no heartbeat yet)"
        state = " (its process is stopped)" if self.state in ("T", "t") else ""
        also = (f"; also silent: rank {', '.join(map(str, self.others))}, likely waiting for it"
                if self.others else "")
        return (f"watchdog: {who}{state}: no progress for {self.silent_s:.0f} s "
                f"(train.hang_timeout={timeout_s:g}){also}")


class Watchdog:
    def __init__(self, run_dir: Path, world_size: int, timeout_s: float,
                 clock: Callable[[], float] = time.monotonic, read_every_s: float = READ_EVERY_S) -> None:
        self.timeout_s = float(timeout_s)
        self.read_every_s = read_every_s
        self.clock = clock
        self.paths = [heartbeat_path(run_dir, rank) for rank in range(world_size)]
        # What an earlier attempt left: ignored until it changes.
        self._seen: list[Optional[str]] = [self._text(path) for path in self.paths]
        self._fresh = [False] * world_size
        self._progress: list[Optional[float]] = [None] * world_size
        self.beats: list[Optional[Beat]] = [None] * world_size
        self.started: Optional[float] = None  # the job's first heartbeat, on our clock
        self._next_read = 0.0

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    @staticmethod
    def _text(path: Path) -> Optional[str]:
        try:
            return path.read_text()
        except OSError:
            return None

    def _read(self, now: float) -> None:
        for rank, path in enumerate(self.paths):
            text = self._text(path)
            if text is None or text == self._seen[rank]:
                continue
            self._seen[rank], self._fresh[rank] = text, True
            self._progress[rank] = now
            self.beats[rank] = read_beat(path) or self.beats[rank]
            if self.started is None:
                self.started = now

    def last_beat(self, rank: int) -> Optional[Beat]:
        """The rank's newest heartbeat of this attempt (read now), for messages."""
        self._read(self.clock())
        return self.beats[rank]

    def poll(self, gone: Iterable[int] = (), state: Callable[[int], str] = lambda rank: ""
             ) -> Optional[Stall]:
        """A rank silent past the timeout, or None. `gone`: ranks whose process ended (their
        silence is no hang); `state`: a rank's process state where the caller can see it.

        A hung rank holds its peers in the next collective, so several ranks go silent
        together. Named is the likeliest culprit: a stopped process, else the rank with the
        lowest last step, else the longest silent (its peers may have beaten once more)."""
        now = self.clock()
        if not self.enabled:
            return None
        if now >= self._next_read:
            self._read(now)
            self._next_read = now + self.read_every_s
        if self.started is None:
            return None
        skip = set(gone)
        silent: list[Stall] = []
        for rank in range(len(self.paths)):
            beat = self.beats[rank]
            if rank in skip or (beat is not None and beat.phase == "exit"):
                continue
            since = self._progress[rank] if self._fresh[rank] else self.started
            quiet = now - (since if since is not None else self.started)
            if quiet > self.timeout_s:
                silent.append(Stall(rank, quiet, beat, state(rank)))
        if not silent:
            return None
        worst = min(silent, key=lambda s: (s.state not in ("T", "t"),
                                           s.beat.step if s.beat else -1, -s.silent_s))
        worst.others = tuple(s.rank for s in silent if s is not worst)
        return worst
