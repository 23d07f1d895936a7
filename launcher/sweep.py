"""Hydra multirun points as jobs, and the sweep's summary table.

cluster=local runs the points one after another; cluster=slurm submits every point as its
own job (its own run dir and checkpoints) and then waits for all of them. Either way every
point runs even when one fails, the summary (final metrics per point, the best marked,
each failure's traceback, or for a rank killed by a signal which signal, with "likely out
of memory" for SIGKILL and the rank's memory high-water mark from its heartbeat) is printed
and written to <sweep dir>/summary.md and summary.json, and the exit status is 1 if any
point failed. Rerunning the same command skips the points whose run dir has done.json
("already done") and resumes the others from their checkpoints.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from launcher.failures import failure_report
from launcher.jobs import FINAL, last_metrics, states

ALREADY_DONE = "already done"  # a point skipped on a rerun: its run dir has done.json


@dataclass
class PointResult:
    num: int
    overrides: list[str]
    run_dir: Path
    sweep_dir: Path
    code: Optional[int] = None  # None while a SLURM job is still out
    job_id: Optional[str] = None
    state: str = ""
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.code == 0


def wait_for_jobs(points: list[PointResult], poll_s: float = 1.0) -> None:
    """Poll every submitted point until its job ends; set code, state and error."""
    out = [p for p in points if p.job_id and p.code is None]
    while out:
        found = states([str(p.job_id) for p in out])
        for p in list(out):
            state = found.get(str(p.job_id), ("UNKNOWN", ""))[0]
            if state in FINAL:
                p.state, p.code = state, 0 if state == "COMPLETED" else 1
                if p.code:
                    p.error = failure_report(p.run_dir)  # which rank, which signal, memory; traceback
                print(f"chatforge: sweep point {p.num} (job {p.job_id}) {state}", flush=True)
                out.remove(p)
        if out:
            time.sleep(poll_s)
            poll_s = min(poll_s * 1.1, 10.0)


def _final(p: PointResult) -> dict[str, Any]:
    """Final step and loss, and the last evaluation loss, from the point's metrics.jsonl."""
    last = last_metrics(p.run_dir)
    evals: list[float] = []
    path = p.run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record.get("eval_loss"), (int, float)):
                evals.append(float(record["eval_loss"]))
    return {"step": last.get("step"), "loss": last.get("loss"),
            "eval_loss": evals[-1] if evals else None}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def best_point(points: list[PointResult]) -> Optional[int]:
    """The succeeded point with the lowest final eval loss (train loss where a point has no
    evaluation); None when nothing succeeded."""
    def key(p: PointResult) -> float:
        value = p.metrics.get("eval_loss")
        if value is None:
            value = p.metrics.get("loss")
        return float(value) if isinstance(value, (int, float)) else math.inf

    done = [p for p in points if p.ok]
    return min(done, key=key).num if done else None


def _swept(points: list[PointResult]) -> tuple[list[str], dict[int, str]]:
    """Overrides shared by every point, and each point's own (what the sweep varies)."""
    common = [o for o in points[0].overrides if all(o in p.overrides for p in points)]
    if len(points) == 1:
        common = []
    own = {p.num: " ".join(o for o in p.overrides if o not in common) for p in points}
    return common, own


def summary_text(points: list[PointResult]) -> str:
    best = best_point(points)
    common, own = _swept(points)
    lines = [f"common overrides: {' '.join(common) or '(none)'}", "",
             "| point | overrides | status | step | loss | eval_loss | run dir |",
             "|---|---|---|---|---|---|---|"]
    for p in points:
        status = ("ok" + (f" ({p.state})" if p.state == ALREADY_DONE else "") if p.ok
                  else (p.state or f"failed (exit {p.code})"))
        mark = " **best**" if p.num == best else ""
        lines.append(f"| {p.num}{mark} | {own[p.num]} | {status} | "
                     f"{_fmt(p.metrics.get('step'))} | {_fmt(p.metrics.get('loss'))} | "
                     f"{_fmt(p.metrics.get('eval_loss'))} | {p.run_dir} |")
    for p in points:
        if not p.ok:
            lines += ["", f"### point {p.num} failed ({own[p.num]})", "", "```",
                      p.error.rstrip() or "(no traceback found)", "```"]
    return "\n".join(lines) + "\n"


def summarize(points: list[PointResult]) -> int:
    """Wait for SLURM points, print and write the summary; 1 if any point failed."""
    if not points:
        return 0
    wait_for_jobs(points)
    for p in points:
        p.metrics = _final(p)
    text = summary_text(points)
    sweep_dir = points[0].sweep_dir
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "summary.md").write_text(f"# sweep summary\n\n{text}")
    records = [{"point": p.num, "overrides": p.overrides, "run_dir": str(p.run_dir),
                "ok": p.ok, "exit_code": p.code, "job_id": p.job_id, "state": p.state,
                **p.metrics, "best": p.num == best_point(points), "error": p.error}
               for p in points]
    (sweep_dir / "summary.json").write_text(json.dumps(records, indent=1))
    print(f"\nchatforge: sweep summary ({sweep_dir / 'summary.md'}):\n{text}", flush=True)
    failed = [p.num for p in points if not p.ok]
    skipped = [p.num for p in points if p.state == ALREADY_DONE]
    if skipped:
        print(f"chatforge: {len(skipped)} of {len(points)} sweep points were already done: "
              f"{', '.join(map(str, skipped))}", flush=True)
    if failed:
        print(f"chatforge: {len(failed)} of {len(points)} sweep points failed: "
              f"{', '.join(map(str, failed))}", file=sys.stderr)
        return 1
    return 0
