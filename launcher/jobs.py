"""`chatforge jobs`, `chatforge logs <run>`, `chatforge cancel <run>`.

Every SLURM submission appends one line to the job index, $CHATFORGE_HOME/jobs.jsonl
(default ~/.chatforge), and writes <run.dir>/logs/slurm/job.json; <run> is a run directory
(a sweep directory means all its points) or a job id. States come from sacct (squeue when
accounting is off); step and loss from the run's metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE"}


def index_path() -> Path:
    home = os.environ.get("CHATFORGE_HOME") or str(Path.home() / ".chatforge")
    return Path(home) / "jobs.jsonl"


def record_job(info: dict[str, Any]) -> None:
    path = index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:  # one short write: concurrent submitters do not interleave
        handle.write(json.dumps(info) + "\n")


def read_index() -> list[dict[str, Any]]:
    path = index_path()
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run(cmd: list[str]) -> Optional[str]:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id -> (state, node list). Unknown ids are left out."""
    if not job_ids:
        return {}
    found: dict[str, tuple[str, str]] = {}
    out = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,NodeList", "-j", ",".join(job_ids)])
    for line in (out or "").splitlines():
        parts = line.split("|")
        if len(parts) >= 3 and parts[0] in job_ids:
            found[parts[0]] = (parts[1].split()[0], parts[2])
    missing = [j for j in job_ids if j not in found or found[j][0] in ("PENDING", "REQUEUED")]
    if missing:  # squeue is fresher while a job is queued or being requeued
        out = _run(["squeue", "-h", "--states=all", "-o", "%i|%T|%N", "-j", ",".join(missing)])
        for line in (out or "").splitlines():
            parts = line.split("|")
            if len(parts) >= 3 and parts[0] in missing:
                found[parts[0]] = (parts[1], parts[2])
    return found


def last_metrics(run_dir: Path) -> dict[str, Any]:
    """The last record with a loss in <run_dir>/metrics.jsonl (reads only the file's end)."""
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - 65536))
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            return record
    return {}


def _entries_for(target: str) -> list[dict[str, Any]]:
    """Index entries of a run dir (or the points of a sweep dir), or of a job id."""
    path = Path(target).expanduser()
    if path.is_dir():
        path = path.absolute()
        infos = [json.loads(p.read_text()) for p in sorted(path.glob("logs/slurm/job.json"))]
        infos += [json.loads(p.read_text()) for p in sorted(
            path.glob("*/logs/slurm/job.json"), key=lambda p: (len(str(p)), str(p)))]
        return infos
    return [info for info in read_index() if str(info["job_id"]) == target]


def jobs_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="chatforge jobs", description="recent SLURM runs")
    parser.add_argument("-n", type=int, default=20, help="how many (newest last)")
    args = parser.parse_args(argv)
    entries = read_index()[-args.n:]
    found = states([str(e["job_id"]) for e in entries])
    # AFTER: the jobs it waits for (a recipe's chain: afterok dependencies on its inputs).
    rows = [("JOBID", "STATE", "AFTER", "NODES", "STEP", "LOSS", "SUBMITTED", "RUN_DIR")]
    for e in entries:
        state, nodes = found.get(str(e["job_id"]), ("UNKNOWN", ""))
        last = last_metrics(Path(e["run_dir"]))
        loss = f"{last['loss']:.4f}" if isinstance(last.get("loss"), (int, float)) else "-"
        when = time.strftime("%m-%d %H:%M", time.localtime(float(e.get("submitted", 0))))
        rows.append((str(e["job_id"]), state, ",".join(e.get("after") or []) or "-", nodes or "-",
                     str(last.get("step", "-")), loss, when, str(e["run_dir"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return 0


def logs_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="chatforge logs", description="print a run's rank log")
    parser.add_argument("run", help="run directory or SLURM job id")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("-f", "--follow", action="store_true", help="until the job ends")
    args = parser.parse_args(argv)
    entries = _entries_for(args.run)
    run_dir = Path(entries[-1]["run_dir"]) if entries else Path(args.run)
    log = run_dir / "logs" / f"rank_{args.rank}.log"
    if not log.exists():
        print(f"chatforge: error: no log {log}", file=sys.stderr)
        return 2
    offset = 0
    while True:
        with open(log, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
        offset += len(data)
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        if not (args.follow and entries):
            return 0
        state = states([str(entries[-1]["job_id"])]).get(str(entries[-1]["job_id"]), ("", ""))[0]
        if state in FINAL:
            return 0
        time.sleep(1.0)


def cancel_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="chatforge cancel", description="scancel a run's job(s)")
    parser.add_argument("run", help="run directory (a sweep directory: every point) or job id")
    args = parser.parse_args(argv)
    entries = _entries_for(args.run)
    if not entries:
        print(f"chatforge: error: no SLURM job recorded for {args.run}", file=sys.stderr)
        return 2
    ids = sorted({str(e["job_id"]) for e in entries})
    done = subprocess.run(["scancel", *ids])
    print(f"chatforge: cancelled {' '.join(ids)}" if done.returncode == 0 else
          f"chatforge: scancel {' '.join(ids)} failed", file=sys.stderr)
    return done.returncode
