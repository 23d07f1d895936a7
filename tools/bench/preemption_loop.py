"""Interrupt one SLURM run again and again; it must requeue, resume, and end with the losses of
an uninterrupted run. Needs the dev cluster (bash slurm/start.sh; source its env.sh).

    python -m tools.bench.preemption_loop --times 10

Signals alternate: SIGUSR1 (the time-limit warning, `scancel --signal=USR1`) and SIGTERM
(preemption's signal, `scancel --signal=TERM`), each after the resumed run has made progress.
Reports, per interruption, the step saved and the seconds from the signal to the first step of
the requeued run; at the end the largest per-step loss difference to the reference run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
COMMON = ["model=tiny", "logger=none", "train.eval_every=0", "data.embedded.num_docs=300",
          "cluster.node_local_prefixes=[]"]


def losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def state(job: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job],
                         capture_output=True, text=True).stdout.split()
    return out[0] if out else "UNKNOWN"


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not after {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--times", type=int, default=10)
    parser.add_argument("--every", type=int, default=15, help="steps between interruptions")
    args = parser.parse_args()
    steps = args.every * (args.times + 2)
    work = Path(tempfile.mkdtemp(prefix="preempt-loop-"))
    run = [*COMMON, f"train.steps={steps}"]
    ref = subprocess.run([str(BIN / "chatforge"), *run, "cluster.procs_per_node=2",
                          f"run.dir={work / 'reference'}"], capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    run_dir = work / "interrupted"
    subprocess.run([str(BIN / "chatforge"), *run, "cluster=slurm", "cluster.nodes=2",
                    f"cluster.max_requeues={args.times}", "cluster.wait=false",
                    f"run.dir={run_dir}"], check=True, capture_output=True)
    job = str(json.loads((run_dir / "logs/slurm/job.json").read_text())["job_id"])
    latencies, saved = [], []
    for i in range(args.times):
        target = (i + 1) * args.every
        wait(lambda: max(losses(run_dir), default=0) >= target, 600, f"step {target}")
        sig = "USR1" if i % 2 == 0 else "TERM"
        before, t0 = lines(run_dir), time.monotonic()
        subprocess.run(["scancel", f"--signal={sig}", job], check=True)
        requeued = i + 1
        wait(lambda: len((run_dir / "logs/slurm/requeues.jsonl").read_text().splitlines())
             >= requeued if (run_dir / "logs/slurm/requeues.jsonl").exists() else False,
             300, f"requeue {requeued}")
        stop_step = max(losses(run_dir))
        wait(lambda: lines(run_dir) > before and max(losses(run_dir)) > stop_step
             and "restart " + str(requeued) in (run_dir / "logs/rank_0.log").read_text(),
             300, f"resume {requeued}")
        latencies.append(time.monotonic() - t0)
        saved.append(stop_step)
        print(f"{i + 1:2d}: SIG{sig:<4s} saved step {stop_step:4d}, first step after requeue "
              f"{latencies[-1]:5.1f} s after the signal", flush=True)
    wait(lambda: state(job) == "COMPLETED", 600, "completion")
    expected, got = losses(work / "reference"), losses(run_dir)
    diff = max(abs(got[s] - expected[s]) for s in expected)
    ok = sorted(got) == sorted(expected) and diff < 1e-6
    print(f"\n{args.times} interruptions, {args.times} requeues, job {job} COMPLETED at step "
          f"{max(got)}; max |loss - uninterrupted| over {len(expected)} steps = {diff:.2e} "
          f"({'equal' if ok else 'DIFFERENT'}); signal -> next step: median "
          f"{statistics.median(latencies):.1f} s, max {max(latencies):.1f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
