"""Reward-model experiment: per-family held-out accuracy of RM variants on one SFT policy.

    python -m tools.rm_experiment --base runs/base6 --out runs/rmexp \
        --variant default= --variant long='train.steps=600' --variant mean='rm.reduce=mean' [--pairs 1200]

--base is a recipe run dir whose tokenizer, pretrain and sft steps have finished, e.g.
    chatforge recipe=default 'recipe.only=[tokenizer,pretrain,sft]' "data.embedded.families=''" run.dir=runs/base6
Every variant is the default recipe's rm step (its settings, with every task family) plus
the variant's overrides (space-separated key=value), trained from that SFT policy in
<out>/<variant>/rm (tokenizer, pretrain and sft are linked there, so the recipe reuses
them); then stage=eval measures it on --pairs held-out pairs with clean labels (their own
random stream, the training tasks). Prints one row per variant: accuracy per family with
its pair count and a normal 95% half-width, and writes <out>/results.json. A variant
already measured is not rerun (delete its directory to redo it). Not a test.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ALL_FAMILIES = "data.embedded.families=''"
SHARED = [ALL_FAMILIES, "data.embedded.eval_tasks=seen", "logger=none", "cluster.threads_per_proc=2"]


def _chatforge() -> str:
    return str(Path(sys.executable).parent / "chatforge")


def _run(args: list[str], log: Path) -> None:
    with open(log, "w") as out:
        done = subprocess.run([_chatforge(), *args], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"chatforge {' '.join(args)} failed ({done.returncode}); see {log}")


def train(base: Path, where: Path, overrides: list[str]) -> Path:
    """The default recipe's rm step with `overrides`, from base's SFT policy."""
    where.mkdir(parents=True, exist_ok=True)
    for step in ("tokenizer", "pretrain", "sft"):
        link = where / step
        if not link.exists():
            link.symlink_to((base / step).resolve(), target_is_directory=True)
    extra = "recipe.steps.rm.extra=[" + ",".join(f'"{o}"' for o in overrides) + "]"
    _run(["recipe=default", "recipe.only=[rm]", f"run.dir={where}", *SHARED, extra], where / "train.log")
    return where / "rm"


def measure(base: Path, rm: Path, pairs: int, overrides: list[str]) -> dict:
    """stage=eval with 8 prompts (cheap) and `pairs` held-out pairs for the reward model."""
    out = rm.parent / "eval"
    data = [o for o in overrides if o.startswith("data.embedded.")]  # the world the RM saw
    _run(["stage=eval", f"run.dir={out}", f"eval.models={base / 'sft'}", f"eval.reward={rm}",
          "data.embedded.num_prompts=8", f"eval.rm_pairs={pairs}", "eval.pass_k=1", "eval.bootstrap=10",
          "eval.decontaminate=false", *SHARED, *data], rm.parent / "eval.log")
    return json.loads((out / "eval.json").read_text())


def row(name: str, results: dict) -> str:
    def cell(acc: float, n: int) -> str:
        return f"{acc:.3f} ±{1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / n):.3f} (n={n})"

    fams = results.get("rm_accuracy_by_family", {})
    cells = [cell(results["rm_accuracy"], results["rm_pairs"])]
    cells += [cell(v["accuracy"], v["pairs"]) for v in fams.values()]
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", action="append", default=[], help="name=key=value key=value ...")
    parser.add_argument("--pairs", type=int, default=1200)
    args = parser.parse_args()
    for step in ("tokenizer", "pretrain", "sft"):
        if not (args.base / step / "done.json").is_file():
            raise SystemExit(f"--base {args.base}: step {step} has not finished (no done.json)")
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for spec in args.variant or ["default="]:
        name, _, rest = spec.partition("=")
        overrides = rest.split()
        if name not in results:
            rm = train(args.base, args.out / name, overrides)
            results[name] = {"overrides": overrides, **measure(args.base, rm, args.pairs, overrides)}
            args.out.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(results, indent=1) + "\n")
        print(row(name, results[name]), flush=True)
    first = next(iter(results.values()), {})
    print("| variant | all | " + " | ".join(first.get("rm_accuracy_by_family", {})) + " |", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
