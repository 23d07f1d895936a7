"""The spread between training seeds: the same recipe evaluated after training with several seeds.

    python -m tools.seed_spread runs/s1234 runs/s1 runs/s2 [--key accuracy] [--out runs/spread]

Each argument is a recipe run dir whose eval step finished (<dir>/eval/eval.json), the runs
differing only in the training seed (`seed=N`) of the steps after SFT, with the evaluation's
own seed fixed (`'recipe.steps.eval.extra=["seed=1234"]'`), so every run evaluates the same
prompts with the same sampling stream and the baseline (SFT) is one and the same model.

Per method whose result differs between runs (not the shared pretrained model): the
difference to the baseline in each run, its mean over runs, the standard deviation between
runs, and a 95% interval for the mean from Student's t with (runs - 1)
degrees of freedom: with 3 runs t = 4.30, so only an effect several times the seed spread
is called significant. Per task family, the mean difference. Writes <out>/seed_spread.md,
seed_spread.json and seed_spread.png (each run's difference per method, the mean marked).
Numpy and matplotlib only; not a test.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

# Two-sided 95% quantiles of Student's t by degrees of freedom (scipy is not a dependency).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t95(dof: int) -> float:
    """The 0.975 quantile of Student's t with `dof` degrees of freedom (normal beyond 9)."""
    if dof < 1:
        raise ValueError(f"t95: {dof} degrees of freedom; the spread needs at least 2 runs")
    return _T95.get(dof, 1.96 + 2.4 / dof)


def load(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "eval" / "eval.json"
    if not path.is_file():
        raise SystemExit(f"seed_spread: {path} does not exist (run the recipe's eval step there)")
    return json.loads(path.read_text())


def mean_interval(values: list[float]) -> dict[str, Any]:
    """Mean, standard deviation between runs and the t interval of the mean."""
    v = np.asarray(values, dtype=np.float64)
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    half = t95(v.size - 1) * sd / math.sqrt(v.size) if v.size > 1 else math.inf
    mean = float(v.mean())
    return {"runs": [float(x) for x in v], "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half,
            "significant": bool(mean - half > 0 or mean + half < 0)}


def spread(evals: list[dict[str, Any]], key: str = "accuracy") -> dict[str, Any]:
    """Per method (every method all runs evaluated, but the baseline): the difference to the
    baseline per run, overall and per family, with its mean and interval over runs."""
    base = {e["baseline"] for e in evals}
    if len(base) != 1:
        raise SystemExit(f"seed_spread: the runs have different baselines {sorted(base)}")
    baseline = base.pop()
    # A model every run shares (the pretrained one: the seed only reaches the steps after SFT)
    # has no spread to measure; its zero-width interval would read as "significant". It is
    # the one whose whole summary is equal in every run (a trained method may repeat `key`).
    methods = [m for m in evals[0]["models"] if m != baseline and all(m in e["models"] for e in evals)
               and len({json.dumps(e["models"][m], sort_keys=True) for e in evals}) > 1]
    families = sorted(set.intersection(*(set(e["by_family"].get(baseline, {})) for e in evals)))
    out: dict[str, Any] = {"baseline": baseline, "key": key, "runs": len(evals),
                           "baseline_value": [e["models"][baseline][key] for e in evals], "methods": {}}
    for m in methods:
        diffs = [e["models"][m][key] - e["models"][baseline][key] for e in evals]
        fam = {f: mean_interval([e["by_family"][m][f][key] - e["by_family"][baseline][f][key] for e in evals])
               for f in families}
        out["methods"][m] = {"value": mean_interval([e["models"][m][key] for e in evals]),
                             "diff": mean_interval(diffs), "by_family": fam}
    return out


def markdown(result: dict[str, Any]) -> str:
    key, base = result["key"], result["baseline"]
    fams = sorted(next(iter(result["methods"].values()))["by_family"]) if result["methods"] else []
    lines = [f"{result['runs']} training seeds; baseline {base} {key} "
             f"{', '.join(f'{v:.3f}' for v in result['baseline_value'])}", "",
             f"| method | {key} per seed | mean | diff to {base}: mean [95% t interval] | sd between seeds | "
             + " | ".join(fams) + " |", "|---|---|---|---|---|" + "---|" * len(fams)]
    for m, r in result["methods"].items():
        d = r["diff"]
        verdict = "" if d["significant"] else ", not significant"
        cells = " | ".join(f"{r['by_family'][f]['mean']:+.3f}" for f in fams)
        lines.append(f"| {m} | {' / '.join(f'{v:.3f}' for v in r['value']['runs'])} | {r['value']['mean']:.3f} | "
                     f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]{verdict} | {d['sd']:.3f} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(result["methods"])
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 3.5))
    for i, m in enumerate(names):
        d = result["methods"][m]["diff"]
        ax.scatter([i] * len(d["runs"]), d["runs"], color="tab:blue", s=18, zorder=3)
        ax.errorbar([i], [d["mean"]], yerr=[[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]] if math.isfinite(d["lo"])
                    else None, fmt="_", color="black", markersize=16, capsize=4)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(f"{result['key']} - {result['baseline']}")
    ax.set_title("difference to the baseline per training seed (dots), mean and 95% t interval")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--key", default="accuracy")
    ap.add_argument("--out", type=Path, default=None, help="default: the first run dir")
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        raise SystemExit("seed_spread: give at least 2 run dirs")
    result = spread([load(r) for r in args.runs], args.key)
    out = args.out or args.runs[0]
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    (out / "seed_spread.md").write_text(text)
    (out / "seed_spread.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "seed_spread.png")
    print(text + f"written: {out}/seed_spread.md, .json, .png")


if __name__ == "__main__":
    main()
