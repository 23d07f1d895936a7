"""Benchmark an exported model with lm-eval-harness, offline.

    python -m tools.hf_eval HF_DIR [--tasks chatforge_tasks,...] [--limit N] [--batch-size B]
                            [--device cpu|cuda] [--out results.json]

HF_DIR is what tools/hf_export.py writes. The tasks are lm-eval task names or YAML files:
`chatforge_tasks` (tools/lm_eval_tasks/, a small multiple-choice task over a local file that
ships with the repository) by default. A task YAML whose `dataset_kwargs.data_files` are
relative paths has them resolved against the YAML's directory, so a task and its data can
live anywhere; nothing is downloaded (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set): a task
of lm-eval's own needs its data set in the local Hugging Face cache first.

lm-eval is an optional dependency (`pip install -c constraints.txt -e ".[lm-eval]"`;
tools/setup.sh installs it). docs/huggingface.md, "Benchmarks".
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

TASK_DIR = Path(__file__).parent / "lm_eval_tasks"
DEFAULT_TASKS = "chatforge_tasks"


def task_config(spec: str) -> Any:
    """A task name (returned as is, or as the config of TASK_DIR/<name>.yaml) or a YAML file's
    config, its relative data_files made absolute."""
    import yaml

    path = Path(spec) if spec.endswith((".yaml", ".yml")) else TASK_DIR / f"{spec}.yaml"
    if not path.is_file():
        if spec.endswith((".yaml", ".yml")):
            raise FileNotFoundError(f"--tasks: no such task file: {path}")
        return spec  # one of lm-eval's own tasks
    config = yaml.safe_load(path.read_text())
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        config["dataset_kwargs"]["data_files"] = {
            split: str(path.parent / f) if not Path(f).is_absolute() else f for split, f in files.items()}
    return config


def evaluate(hf_dir: Path, tasks: Sequence[str], limit: Optional[int] = None, batch_size: int = 8,
             device: str = "cpu") -> dict[str, Any]:
    """lm-eval's results for `tasks` on the model in `hf_dir`: {"results": {task: {metric: value}},
    "n-samples": ...} as lm_eval.simple_evaluate returns it (trimmed to what serialises)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (export the run with python -m tools.hf_export)")
    from lm_eval import simple_evaluate

    out = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir.resolve()},dtype=float32",
                          tasks=[task_config(t) for t in tasks], limit=limit, batch_size=batch_size,
                          device=device, log_samples=False)
    return {"results": out["results"], "n-samples": out.get("n-samples", {}), "model": str(hf_dir)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.hf_eval", description=__doc__.split("\n")[0])
    parser.add_argument("hf_dir", type=Path, help="an exported model directory (tools/hf_export.py)")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated task names or YAML files")
    parser.add_argument("--limit", type=int, help="at most this many documents per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        results = evaluate(args.hf_dir, [t for t in args.tasks.split(",") if t], args.limit,
                           args.batch_size, args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"hf_eval: error: {exc}", flush=True)
        return 2
    text = json.dumps(results, indent=1, default=str)
    if args.out:
        args.out.write_text(text + "\n")
    for task, metrics in results["results"].items():
        # lm-eval names a metric "acc,none" (metric, filter); "none" is the unfiltered one.
        shown = ", ".join(f"{k.removesuffix(',none')}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"[hf_eval] {task}: {shown}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
