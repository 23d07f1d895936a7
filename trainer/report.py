"""The recipe's report: report.md with its plots at the top, written by the eval stage.

Reads the evaluation results (trainer/stages/evaluate.py) and the metrics.jsonl of every run
it is given; draws three PNGs beside report.md:
    report_losses.png   the training loss (and held-out loss) of every stage that has one
    report_rl.png       reward and KL per PPO/A2C iteration (runs that log `reward` and `kl`)
    report_gold.png     gold reward and task accuracy per method (bars)
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
    ("accuracy", "task accuracy", "{:.3f}"),
    ("win_rate", "win rate vs baseline", "{:.3f}"),
    ("kl", "KL to baseline (nats)", "{:.2f}"),
    ("response_length", "length (tokens)", "{:.1f}"),
    ("reward", "RM score", "{:.3f}"),
)
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
                         plot_gold(results, Path(f"{stem}_gold.png"))) if p is not None]
    parts = ["# chatforge report", ""]
    parts += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    baseline = results.get("baseline") or "-"
    parts += [f"## Methods on {results.get('prompts', '?')} held-out prompts (baseline: {baseline})", "",
              results_table(results), ""]
    if "rm_accuracy" in results:
        parts += [f"Reward model accuracy on held-out pairs: {results['rm_accuracy']:.3f}", ""]
    parts += ["Gold reward and task accuracy are the embedded world's gold scorer on one sampled "
              "response per prompt (the same sampling seed for every method); win rate counts a tie "
              "as one half; KL is per response, summed over its tokens; best-of-N's KL is the "
              "analytic log N - (N-1)/N.", "", "## Stages", "", stages_table(runs, dirs), ""]
    text = "\n".join(parts)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
