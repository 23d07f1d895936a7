"""Seconds from the command to the first training step: chatforge vs starting the trainer bare.

    python -m tools.bench.launch_overhead --reps 5            # local only
    python -m tools.bench.launch_overhead --reps 5 --slurm    # also the dev cluster
                                                              # (bash slurm/start.sh first)

Variants, run alternately in each repetition so that drifts hit all of them alike:
  local/chatforge   `chatforge cluster=local cluster.procs_per_node=2 ...`
  local/torchrun    `torchrun --nproc-per-node 2 -m trainer <config.yaml>` (config written
                    beforehand, untimed: the user of bare torchrun already has one)
  slurm/chatforge   `chatforge cluster=slurm cluster.nodes=2 cluster.wait=false ...`
  slurm/sbatch      `sbatch` of a two-line script: `srun python -m trainer <config.yaml>`
The clock stops when metrics.jsonl holds its first step; the run is then killed (SIGKILL to
the whole process tree / every job step, so that nothing, not even a stop-signal checkpoint,
competes with the next measurement). Every run gets a fresh
run dir and the same pre-trained tokenizer. Goals (issue 4): <= +3 s locally, <= 1.2x on SLURM.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMMON = ["model=tiny", "logger=none", "train.steps=50", "train.eval_every=0",
          "data.embedded.num_docs=300", "cluster.node_local_prefixes=[]"]


def first_step_seen(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return False
    return any('"loss"' in line for line in path.read_text().splitlines())


def wait_first_step(run_dir: Path, t0: float, timeout: float = 300) -> float:
    while time.monotonic() - t0 < timeout:
        if first_step_seen(run_dir):
            return time.monotonic() - t0
        time.sleep(0.05)
    raise TimeoutError(f"no training step in {run_dir} after {timeout} s")


def write_config(run_dir: Path, overrides: list[str]) -> Path:
    from launcher.cli import preflight
    from launcher.resolved import write_resolved_config

    points, errors = preflight([*overrides, f"run.dir={run_dir}"], multirun=False)
    assert not errors, errors
    return write_resolved_config(points[0].cfg, run_dir)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process and every descendant: torchrun starts its workers in their own
    sessions, so killing its process group would leave them training (and skew the next
    measurement)."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)
    proc.wait()


def local_chatforge(run_dir: Path, overrides: list[str]) -> float:
    t0 = time.monotonic()
    proc = subprocess.Popen([str(BIN / "chatforge"), *overrides, "cluster.procs_per_node=2",
                             f"run.dir={run_dir}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    seconds = wait_first_step(run_dir, t0)
    _kill_tree(proc)
    return seconds


def local_torchrun(run_dir: Path, overrides: list[str]) -> float:
    config = write_config(run_dir, [*overrides, "cluster.procs_per_node=2"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen([str(BIN / "torchrun"), "--nproc-per-node", "2", "-m", "trainer",
                             str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    seconds = wait_first_step(run_dir, t0)
    _kill_tree(proc)
    return seconds


def _scancel_now(job: str) -> None:
    subprocess.run(["scancel", "--signal=KILL", "--full", job], capture_output=True)
    subprocess.run(["scancel", job], capture_output=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the next measurement starts on idle nodes
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                             text=True).stdout.strip()
        if not out or out in ("CANCELLED", "COMPLETED", "FAILED"):
            return
        time.sleep(0.2)


def slurm_chatforge(run_dir: Path, overrides: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run([str(BIN / "chatforge"), *overrides, "cluster=slurm", "cluster.nodes=2",
                    "cluster.wait=false", f"run.dir={run_dir}"], check=True,
                   stdout=subprocess.DEVNULL)
    seconds = wait_first_step(run_dir, t0)
    _scancel_now(json.loads((run_dir / "logs/slurm/job.json").read_text())["job_id"])
    return seconds


def slurm_sbatch(run_dir: Path, overrides: list[str]) -> float:
    config = write_config(run_dir, [*overrides, "cluster=slurm", "cluster.nodes=2"])
    script = run_dir / "bare.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --nodes=2 --ntasks-per-node=1 --cpus-per-task=1\n"
                      f"#SBATCH --output={run_dir}/bare.out\n"
                      f"OMP_NUM_THREADS=1 srun {sys.executable} -m trainer {config}\n")
    t0 = time.monotonic()
    out = subprocess.run(["sbatch", "--parsable", str(script)], check=True, capture_output=True,
                         text=True).stdout.strip()
    seconds = wait_first_step(run_dir, t0)
    _scancel_now(out.split(";")[0])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--slurm", action="store_true", help="also measure on the dev cluster")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="launch-bench-"))
    warm = work / "warm"
    print("warm-up run (trains the shared tokenizer) ...", flush=True)
    local_chatforge(warm, COMMON)
    tokenizer = next((warm / "tokenizer").glob("*.model"))
    overrides = [*COMMON, f"tokenizer.path={tokenizer}"]
    variants: dict[str, Callable[[Path, list[str]], float]] = {
        "local/chatforge": local_chatforge, "local/torchrun": local_torchrun}
    if args.slurm:
        variants.update({"slurm/chatforge": slurm_chatforge, "slurm/sbatch": slurm_sbatch})
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(args.reps):
        for name, measure in variants.items():
            seconds = measure(work / f"{name.replace('/', '-')}-{rep}", overrides)
            times[name].append(seconds)
            print(f"rep {rep} {name:16s} {seconds:6.2f} s", flush=True)
    print(f"\n{'variant':16s} {'median':>7s} {'mean':>7s} {'min':>7s} {'max':>7s}  (s, n={args.reps})")
    for name, values in times.items():
        print(f"{name:16s} {statistics.median(values):7.2f} {statistics.mean(values):7.2f} "
              f"{min(values):7.2f} {max(values):7.2f}")
    med = {name: statistics.median(values) for name, values in times.items()}
    print(f"local: chatforge - torchrun = {med['local/chatforge'] - med['local/torchrun']:+.2f} s "
          "(goal <= +3 s)")
    if args.slurm:
        print(f"slurm: chatforge / sbatch = {med['slurm/chatforge'] / med['slurm/sbatch']:.2f}x "
              "(goal <= 1.2x)")
    if args.out:
        args.out.write_text(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
