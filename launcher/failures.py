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


# Lines of a failed rank's log shown (a traceback may use up to 3x as many).
TAIL_LINES = 40
# Only the log's end is read: a long run's log can be large, its traceback is at the end.
TAIL_BYTES = 1 << 20


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The traceback of a failed rank if its log has one, else its last lines."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - TAIL_BYTES))
            text = f.read().decode(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    # torch prefixes a rank's lines ("[rank0]: Traceback ..."), so look inside lines.
    starts = [i for i, line in enumerate(text) if "Traceback (most recent call" in line]
    if starts:
        first = starts[-1]
        # Walk back over chained exceptions ("The above exception was the direct cause ...").
        for prev in reversed(starts[:-1]):
            if not any("direct cause" in line or "During handling" in line
                       for line in text[max(prev, first - 3):first]):
                break
            first = prev
        report = text[first:]
        if len(report) > 3 * lines:  # keep where it started and how it ended
            report = report[:10] + ["..."] + report[-(3 * lines - 10):]
        return "\n".join(report)
    return "\n".join(text[-lines:])


def failure_text(run_dir: Path) -> str:
    """The traceback of the first rank whose log has one (else rank 0's tail)."""
    logs = sorted((run_dir / "logs").glob("rank_*.log"),
                  key=lambda p: int(p.stem.split("_")[1]))
    for path in logs:
        tail = log_tail(path)
        if "Traceback (most recent call" in tail:
            return f"{path}:\n{tail}"
    return f"{logs[0]}:\n{log_tail(logs[0])}" if logs else f"(no rank logs in {run_dir}/logs)"


def failure_report(run_dir: Path) -> str:
    """What a failed run says: the launcher's verdict (which rank, killed by which signal, its
    memory peak), then the traceback if a rank left one (else rank 0's last lines)."""
    verdict = failure_line(run_dir)
    return (verdict + "\n" if verdict else "") + failure_text(run_dir)
