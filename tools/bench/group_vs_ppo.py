"""B9: a GRPO iteration against a PPO iteration on the same prompts x samples (not a test).

    python -m tools.bench.group_vs_ppo [--model tiny|small --layers/--hidden/--heads/--seq N --rollout-batch 8 --samples 4
        --iterations 5 --warmup 2 --rounds 2 --work-dir DIR --out FILE.json]

One command, several child processes of tools.bench.ppo_iteration (each one rank, gloo on
CPU, the same SFT policy and reward model prepared once in --work-dir): PPO (critic from the
reward model, KL in the reward) and GRPO (no critic, KL as a k3 loss term), both with
--rollout-batch prompts x --samples responses, the reward model as the only reward source,
one pass over the rollout (ppo.epochs=1) in minibatches of train.global_batch=8. The children
run in the order PPO, GRPO, GRPO, PPO (ABBA, --rounds times), so a drift in the machine's
speed weighs on both alike. Per child: the median wall time of a whole train_step, its phases
(tools/bench/ppo_iteration.py: B5's iteration / sum(phases) ratio comes with it) and the peak
resident memory the stage added after the imports (models, optimizers, KV cache,
activations). Reported: the median GRPO / PPO ratio of iteration time (goal <= 0.7) and of
stage memory (goal <= 0.75), and GRPO's iteration / sum(phases) (goal <= 1.10).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]


def child(stage: str, args: argparse.Namespace, work: Path, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "tools.bench.ppo_iteration", "--model", args.model, "--stage", stage,
           "--rollout-batch", str(args.rollout_batch), "--samples", str(args.samples), "--epochs", "1",
           "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--work-dir", str(work),
           "--out", str(out)] + [f"--{k}={v}" for k in ("layers", "hidden", "heads", "seq")
                                 if (v := getattr(args, k)) is not None]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL if args.quiet else None)
    return json.loads(out.read_text())


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m tools.bench.group_vs_ppo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    for name in ("layers", "hidden", "heads", "seq"):
        p.add_argument(f"--{name}", type=int, default=None, help="overrides the preset's shape")
    p.add_argument("--rollout-batch", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each: PPO, GRPO, GRPO, PPO)")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="chatforge-b9-"))
    found: dict[str, list[dict[str, Any]]] = {"ppo": [], "grpo": []}
    for r in range(args.rounds):
        for k, stage in enumerate(("ppo", "grpo", "grpo", "ppo")):
            found[stage].append(child(stage, args, work, work / f"{stage}_{r}_{k}.json"))
    med = statistics.median
    time_ratios = [g["iteration_s"] / q["iteration_s"] for g, q in zip(found["grpo"], found["ppo"])]
    memory_ratios = [g["stage_peak_mb"] / q["stage_peak_mb"] for g, q in zip(found["grpo"], found["ppo"])]
    report = {
        "bench": "group_vs_ppo",
        "command": " ".join(["python -m tools.bench.group_vs_ppo", *(argv if argv is not None else sys.argv[1:])]),
        "time_ratio": med(time_ratios), "time_ratios": time_ratios,
        "memory_ratio": med(memory_ratios), "memory_ratios": memory_ratios,
        "ppo_iteration_s": med(q["iteration_s"] for q in found["ppo"]),
        "grpo_iteration_s": med(g["iteration_s"] for g in found["grpo"]),
        "ppo_stage_peak_mb": med(q["stage_peak_mb"] for q in found["ppo"]),
        "grpo_stage_peak_mb": med(g["stage_peak_mb"] for g in found["grpo"]),
        "grpo_iteration_over_phases": med(g["ratio"] for g in found["grpo"]),
        "ppo_phase_s": {k: med(q["phase_s"][k] for q in found["ppo"]) for k in found["ppo"][0]["phase_s"]},
        "grpo_phase_s": {k: med(g["phase_s"][k] for g in found["grpo"]) for k in found["grpo"][0]["phase_s"]},
        "parameters_per_model": found["ppo"][0]["parameters"],
    }
    print(f"\nB9 GRPO / PPO, {args.rollout_batch} prompts x {args.samples} samples, {args.model}: iteration time "
          f"{report['grpo_iteration_s']:.3f}s / {report['ppo_iteration_s']:.3f}s = {report['time_ratio']:.3f} "
          f"(goal <= 0.7); stage memory {report['grpo_stage_peak_mb']:.0f} MB / {report['ppo_stage_peak_mb']:.0f} MB "
          f"= {report['memory_ratio']:.3f} (goal <= 0.75); GRPO iteration / sum(phases) "
          f"{report['grpo_iteration_over_phases']:.3f} (goal <= 1.10)")
    print(json.dumps(report))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
