"""What the launchers say about a rank that failed, and where they record it.

<run.dir>/logs/failure.json holds the verdict on the run's last failed attempt (which rank,
its exit code, the line said), written by the local launcher and by the SLURM task wrapper
and read by a sweep's summary: a rank killed by a signal leaves no traceback, so the
verdict is all there is to say. Torch-free.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Optional

from trainer.exitcodes import MEANING
from trainer.heartbeat import Beat

FAILURE_FILE = "failure.json"


def death_line(rank: int, code: int, beat: Optional[Beat]) -> str:
    """A failed rank: its host, last step and memory peak when it beat, which signal killed
    it, and for SIGKILL the usual culprit."""
    who = beat.where() if beat else f"rank {rank}"
    if code > 128 and code - 128 in signal.valid_signals():
        sig = signal.Signals(code - 128)
        oom = ": likely out of memory" if sig == signal.SIGKILL else ""
        return f"{who} killed by signal {sig.value} ({sig.name}){oom}; exit code {code}"
    return f"{who} {MEANING.get(code, 'failed')} with exit code {code}"


def _path(run_dir: Path) -> Path:
    return Path(run_dir) / "logs" / FAILURE_FILE


def clear_failure(run_dir: Path) -> None:
    _path(run_dir).unlink(missing_ok=True)


def record_failure(run_dir: Path, rank: int, code: int, line: str) -> None:
    path = _path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "exit_code": code, "message": line, "time": time.time()}
    path.write_text(json.dumps(record) + "\n")


def failure_line(run_dir: Path) -> str:
    """The verdict on the run's last failure ("" if none was recorded)."""
    try:
        return str(json.loads(_path(run_dir).read_text())["message"])
    except (OSError, ValueError, KeyError):
        return ""
