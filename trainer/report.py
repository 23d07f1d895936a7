"""The recipe's report: report.md with its plots at the top, written by the eval stage.

Reads the evaluation results (trainer/stages/evaluate.py) and the metrics.jsonl of every run
it is given; draws three PNGs beside report.md:
    report_losses.png   the training loss (and held-out loss) of every stage that has one
    report_rl.png       reward and KL per PPO/A2C iteration (runs that log `reward` and `kl`)
    report_gold.png     gold reward and task accuracy per method (bars)
    report_families.png pass@1 (sampled) per task family and method with its bootstrap 95%
                        interval, and the baseline's oracle pass@k (the ceiling)
The tables: every method's means; its differences to the baseline with their paired
bootstrap 95% confidence intervals ("not significant" where the interval contains 0); the
same per task family; the reward model's held-out accuracy (per family); the stages.
Torch-free: matplotlib only (Agg backend), so a finished recipe can be re-reported anywhere.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (key in the results, column title, format)
    ("gold_reward", "gold reward", "{:.3f}"),
    ("accuracy", "pass@1 sampled", "{:.3f}"),
    ("greedy_accuracy", "pass@1 greedy", "{:.3f}"),
    ("win_rate", "win rate vs baseline", "{:.3f}"),
    ("kl", "KL to baseline (nats)", "{:.2f}"),
    ("response_length", "length (tokens)", "{:.1f}"),
    ("reward", "RM score", "{:.3f}"),
)
# The differences to the baseline the report shows: (key, column title, format of the values).
DIFF_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("accuracy", "pass@1 sampled", "{:+.3f}"),
    ("greedy_accuracy", "pass@1 greedy", "{:+.3f}"),
    ("response_length", "length", "{:+.1f}"),
    ("reward", "RM score", "{:+.3f}"),
)
# Below this many prompts a percentile bootstrap interval means little (3 prompts that all
# differ give the point interval [-1, -1]): the report gives the difference alone.
MIN_PROMPTS = 10
LOSS_KEYS = ("loss", "eval_loss")
RL_KEYS = ("reward", "kl")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of <run_dir>/metrics.jsonl (a torn last line, from a killed run, skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(int(r["step"]), float(r[key])) for r in records
              if isinstance(r.get(key), (int, float)) and "step" in r and math.isfinite(float(r[key]))]
    return [s for s, _ in points], [v for _, v in points]


def _stage_of(run_dir: Path) -> str:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return "?"
    try:
        from omegaconf import OmegaConf

        return str(OmegaConf.load(path).stage.name)
    except Exception:  # a report must not fail on one odd config
        return "?"


def plot_losses(runs: dict[str, list[dict[str, Any]]], path: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: recs for name, recs in runs.items() if _series(recs, "loss")[0]}
    if not curves:
        return None
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, recs) in zip(axes.flat, curves.items()):
        for key, style in zip(LOSS_KEYS, ("-", "o--")):
            steps, values = _series(recs, key)
            if steps:
                ax.plot(steps, values, style, label=key, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_rl(runs: dict[str, list[dict[str, Any]]], path: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: recs for name, recs in runs.items() if all(_series(recs, k)[0] for k in RL_KEYS)}
    if not curves:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key in zip(axes, RL_KEYS):
        for name, recs in curves.items():
            ax.plot(*_series(recs, key), marker="o", markersize=3, label=name)
        ax.set_title({"reward": "reward per iteration (RM score or verifier)", "kl": "KL to the reference (nats)"}[key])
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_gold(results: dict[str, Any], path: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results.get("models", {})
    names = [n for n, m in models.items() if "gold_reward" in m]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names)), 3.4))
    width = 0.4
    for k, (key, label) in enumerate((("gold_reward", "gold reward"), ("accuracy", "task accuracy"))):
        xs = [i + (k - 0.5) * width for i in range(len(names))]
        values = [float(models[n].get(key, float("nan"))) for n in names]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_title(f"held-out prompts: {results.get('prompts', '?')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_families(results: dict[str, Any], path: Path) -> Optional[Path]:
    """Grouped bars: pass@1 (sampled) per family and method, bootstrap 95% intervals as error
    bars; the baseline's oracle pass@k as a black tick per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_family = {name: fams for name, fams in results.get("by_family", {}).items()
                 if fams and all("accuracy" in v for v in fams.values())}
    if not by_family:
        return None
    families = sorted({f for fams in by_family.values() for f in fams})
    names = list(by_family)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(families) + 0.15 * len(names) * len(families)), 3.8))
    for k, name in enumerate(names):
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(families))]
        means = [by_family[name].get(f, {}).get("accuracy", float("nan")) for f in families]
        cis = [by_family[name].get(f, {}).get("accuracy_ci", [m, m]) for f, m in zip(families, means)]
        err = [[max(m - lo, 0.0) for m, (lo, _) in zip(means, cis)], [max(hi - m, 0.0) for m, (_, hi) in zip(means, cis)]]
        ax.bar(xs, means, width, yerr=err, capsize=2, label=name, error_kw={"elinewidth": 0.8})
    ceiling = results.get("pass_k", {})
    if ceiling.get("by_family"):
        ax.scatter(range(len(families)), [ceiling["by_family"].get(f, float("nan")) for f in families],
                   marker="_", s=900, color="black", label=f"{ceiling.get('model')} pass@{ceiling.get('k')}")
    ax.set_xticks(range(len(families)), families)
    ax.set_ylim(0, 1.3)  # room for the legend above the bars
    ax.set_ylabel("pass@1 (sampled)")
    ax.set_title("per task family, with bootstrap 95% intervals")
    ax.legend(fontsize=6, ncol=min(5, len(names) + 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def diff_cell(found: Optional[dict[str, Any]], fmt: str) -> str:
    """`+0.031 [-0.010, +0.072] not significant` (a difference and its interval), or -."""
    if not found:
        return "-"
    if found["n"] < MIN_PROMPTS:
        return f"{fmt.format(found['diff'])} (n={found['n']}: too few prompts for an interval)"
    text = f"{fmt.format(found['diff'])} [{fmt.format(found['lo'])}, {fmt.format(found['hi'])}]"
    return text if found["significant"] else f"{text} not significant"


def differences_table(results: dict[str, Any]) -> str:
    """Per method: its differences to the baseline over all prompts, with their intervals."""
    rows = results.get("vs_baseline", {})
    keys = [c for c in DIFF_COLUMNS if any(c[0] in r.get("all", {}) for r in rows.values())]
    if not keys:
        return ""
    lines = ["| method | " + " | ".join(title for _, title, _ in keys) + " |", "|---|" + "---|" * len(keys)]
    for name, found in rows.items():
        lines.append(f"| {name} | " + " | ".join(diff_cell(found["all"].get(k), fmt) for k, _, fmt in keys) + " |")
    return "\n".join(lines)


def family_tables(results: dict[str, Any]) -> list[str]:
    """One table per task family: every method's pass@1 (sampled, greedy) with its difference
    to the baseline, its share of the baseline's headroom (pass@k - pass@1), KL and length."""
    by_family, diffs = results.get("by_family", {}), results.get("vs_baseline", {})
    base, ceiling = results.get("baseline"), results.get("pass_k", {})
    families = sorted({f for fams in by_family.values() for f in fams})
    removed = results.get("removed", {}).get("by_family", {})
    parts = []
    for fam in families:
        top = ceiling.get("by_family", {}).get(fam)
        base_acc = by_family.get(base, {}).get(fam, {}).get("accuracy")
        prompts = next((v[fam]["prompts"] for v in by_family.values() if fam in v), 0)
        head = f"### {fam}: {prompts} prompts ({removed.get(fam, 0)} removed as training prompts)"
        if top is not None:
            head += f"; oracle pass@{ceiling['k']} of {ceiling['model']}: {top:.3f}"
        lines = [head, "", "| method | pass@1 sampled | vs baseline | share of headroom | pass@1 greedy | "
                 "vs baseline | KL | length |", "|---|---|---|---|---|---|---|---|"]
        for name, fams in by_family.items():
            v = fams.get(fam, {})
            d = diffs.get(name, {}).get("by_family", {}).get(fam, {})
            share = "-"
            if d.get("accuracy") and top is not None and base_acc is not None and top > base_acc:
                share = f"{d['accuracy']['diff'] / (top - base_acc):+.2f}"
            cells = [f"{v['accuracy']:.3f}" if "accuracy" in v else "-", diff_cell(d.get("accuracy"), "{:+.3f}"),
                     share, f"{v['greedy_accuracy']:.3f}" if "greedy_accuracy" in v else "-",
                     diff_cell(d.get("greedy_accuracy"), "{:+.3f}"), f"{v['kl']:.2f}" if "kl" in v else "-",
                     f"{v['response_length']:.1f}" if "response_length" in v else "-"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        parts += lines + [""]
    return parts


def prompts_line(results: dict[str, Any]) -> str:
    removed = results.get("removed", {})
    drawn = results.get("drawn", results.get("prompts", "?"))
    text = f"{drawn} evaluation prompts drawn; {removed.get('total', 0)} removed as word-for-word training prompts"
    if removed.get("by_family"):
        text += " (" + ", ".join(f"{f} {n}" for f, n in removed["by_family"].items()) + ")"
    return text + f"; {results.get('prompts', '?')} evaluated."


def rm_lines(results: dict[str, Any]) -> list[str]:
    if "rm_accuracy" not in results:
        return []
    pairs = results.get("rm_pairs")
    lines = [f"Reward model accuracy on held-out pairs: {results['rm_accuracy']:.3f}"
             + (f" ({pairs} pairs, clean labels)" if pairs else ""), ""]
    if "rm_accuracy_unseen" in results:
        lines[-1:] = [f"On the {results['rm_pairs_unseen']} of them whose prompt is no training prompt (as the "
                      f"evaluation prompts): {results['rm_accuracy_unseen']:.3f}", ""]
    fams = results.get("rm_accuracy_by_family", {})
    if fams:
        lines += ["| family | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams),
                  "| accuracy | " + " | ".join(f"{v['accuracy']:.3f}" for v in fams.values()) + " |",
                  "| pairs | " + " | ".join(str(v["pairs"]) for v in fams.values()) + " |", ""]
    return lines


def results_table(results: dict[str, Any]) -> str:
    models = results.get("models", {})
    keys = [c for c in COLUMNS if any(c[0] in m for m in models.values())]
    lines = ["| method | " + " | ".join(title for _, title, _ in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for name, summary in models.items():
        cells = [fmt.format(summary[key]) if key in summary else "-" for key, _, fmt in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stages_table(runs: dict[str, list[dict[str, Any]]], dirs: dict[str, Path]) -> str:
    lines = ["| run | stage | steps | last loss | held-out | minutes |", "|---|---|---|---|---|---|"]
    for name, recs in runs.items():
        last = recs[-1] if recs else {}
        loss = next((r["loss"] for r in reversed(recs) if isinstance(r.get("loss"), (int, float))), None)
        held = next(((k, r[k]) for r in reversed(recs) for k in ("eval_accuracy", "eval_loss", "eval_reward")
                     if isinstance(r.get(k), (int, float))), None)
        minutes = last.get("elapsed")
        lines.append(" | ".join([
            f"| {name}", _stage_of(dirs[name]), str(last.get("step", "-")),
            f"{loss:.4f}" if loss is not None else "-",
            f"{held[0]} {held[1]:.4f}" if held else "-",
            f"{minutes / 60:.1f}" if isinstance(minutes, (int, float)) else "-"]) + " |")
    return "\n".join(lines)


def write_report(path: Path, results: dict[str, Any], run_dirs: list[Path]) -> Path:
    """Write report.md (and its PNGs) at `path` from the eval results and the runs' metrics."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dirs = {d.name: d for d in run_dirs}
    runs = {name: read_metrics(d) for name, d in dirs.items()}
    stem = path.with_suffix("")
    plots = [p for p in (plot_losses(runs, Path(f"{stem}_losses.png")), plot_rl(runs, Path(f"{stem}_rl.png")),
                         plot_gold(results, Path(f"{stem}_gold.png")),
                         plot_families(results, Path(f"{stem}_families.png"))) if p is not None]
    parts = ["# chatforge report", ""]
    parts += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    baseline = results.get("baseline") or "-"
    parts += [f"## Methods on {results.get('prompts', '?')} evaluation prompts (baseline: {baseline})", "",
              prompts_line(results), "", results_table(results), ""]
    ceiling = results.get("pass_k")
    if ceiling:
        parts += [f"Oracle pass@{ceiling['k']} of {ceiling['model']} (right if any of {ceiling['k']} samples is; "
                  f"the ceiling of picking among its samples): {ceiling['all']:.3f}", ""]
    parts += rm_lines(results)
    parts += ["Gold reward and pass@1 are the embedded world's gold scorer on one response per prompt "
              "(sampled at temperature 1 with the same seed for every method, or greedy); win rate counts a "
              "tie as one half; KL is per response, summed over its tokens; best-of-N's KL is the "
              "analytic log N - (N-1)/N.", ""]
    table = differences_table(results)
    if table:
        boot = results.get("bootstrap", {})
        parts += [f"## Differences to the baseline ({baseline})", "",
                  f"Mean difference over prompts [paired bootstrap {100 * boot.get('level', 0.95):.0f}% "
                  f"confidence interval, {boot.get('resamples', '?')} resamples of the prompts, seed "
                  f"{boot.get('seed', '?')}]; \"not significant\" where the interval contains 0.", "", table, ""]
    families = family_tables(results)
    if families:
        parts += ["## Per task family", "", "Share of headroom: the gain in sampled pass@1 over the baseline "
                  "divided by the baseline's (pass@k - pass@1).", ""] + families
    parts += ["## Stages", "", stages_table(runs, dirs), ""]
    text = "\n".join(parts)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
