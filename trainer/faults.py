"""Crash drills (train.fault.crash): a rank that raises, or that dies of SIGKILL as under the
kernel's out-of-memory killer, after a given step. They test the watchdog and a sweep's
failure summary; off by default. A drill fires once per run dir (recorded in
logs/faults.jsonl), as a transient fault would, so rerunning the command completes. (NaN
gradients: trainer/guard.py.) Torch-free: the launcher validates the key with parse_crash."""
from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Optional

from chatforge_config.trainer import FaultConfig
from trainer.heartbeat import Heartbeat

CRASH_KINDS = ("raise", "kill")
_CRASH = re.compile(r"^(raise|kill)@([1-9][0-9]*)$")


def parse_crash(value: str) -> Optional[tuple[str, int]]:
    """("raise" | "kill", step) for a drill, None when off; ValueError saying the format."""
    if value in ("", "none"):
        return None
    match = _CRASH.match(str(value))
    if not match:
        raise ValueError("must be none, raise@N or kill@N (N: a step >= 1)")
    return match.group(1), int(match.group(2))


def crash_drill(fault: FaultConfig, step: int, rank: int, heart: Heartbeat, run_dir: Path) -> None:
    """After 1-based step `step`: raise or die here if a drill is due on this rank."""
    drill = parse_crash(str(fault.crash))
    if drill is None or drill[1] != step or rank != int(fault.crash_rank):
        return
    record = Path(run_dir) / "logs" / "faults.jsonl"
    entry = {"crash": str(fault.crash), "rank": rank}
    if record.exists() and json.dumps(entry) in record.read_text().splitlines():
        return  # fired in an earlier attempt of this run
    with open(record, "a") as handle:
        handle.write(json.dumps(entry) + "\n")
    heart.beat(step, "crash", force=True)  # the watchdog names this step and the memory peak
    if drill[0] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"fault injection: train.fault.crash={fault.crash} on rank {rank}")
