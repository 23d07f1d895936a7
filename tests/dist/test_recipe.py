"""`chatforge recipe=smoke`: the whole recipe end to end through the real command, locally.

One test, three invocations of the same command (the smoke recipe is the suite's costliest
single thing; its steps run once):
1. SFT stopped early (train.exit_interval) -> the chain stops there (exit 75), nothing after
   SFT starts from an unfinished input;
2. rerun -> the finished steps are skipped, SFT resumes from its checkpoint, every later step
   runs, every stage leaves its checkpoint (best-of-N its results) and the report has its table;
3. rerun -> nothing to do.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from omegaconf import OmegaConf

from tests.conftest import REPO, run_trainer

pytestmark = pytest.mark.dist

CHATFORGE = Path(sys.executable).parent / "chatforge"
TRAINED = ("pretrain", "sft", "rm", "ppo", "a2c", "grpo", "grpo_rm", "dpo", "rejection_sampling")
METHODS = ("pretrain", "sft", "ppo", "a2c", "grpo", "grpo_rm", "dpo", "best_of_n", "rejection_sampling")
STAGE_OF = {"grpo_rm": "grpo"}  # a recipe step named apart from its stage


def _recipe(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHATFORGE), "recipe=smoke", f"run.dir={run_dir}", *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=900)


def test_smoke_recipe_runs_every_stage_resumes_and_reports(tmp_path: Path) -> None:
    run = tmp_path / "recipe"
    first = _recipe(run, 'recipe.steps.sft.extra=["train.exit_interval=2"]')
    assert first.returncode == 75, first.stderr[-3000:]
    assert "recipe step sft stopped before its end" in first.stderr
    assert (run / "sft" / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert not (run / "rm").exists()

    second = _recipe(run)
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout
    assert "recipe step 1/12 tokenizer: done, skipped" in out and "step 2/12 pretrain: done, skipped" in out
    assert "continuing at step 2" in (run / "sft" / "logs" / "rank_0.log").read_text()
    for name in TRAINED:
        assert (run / name / "checkpoints" / "latest").read_text().strip().startswith("step_"), name
        assert json.loads((run / name / "done.json").read_text())["stage"] == STAGE_OF.get(name, name)
    assert (run / "tokenizer" / "tokenizer" / "tokenizer.model").is_file()
    assert json.loads((run / "best_of_n" / "best_of_n.json").read_text())["prompts"] == 16
    results = json.loads((run / "eval" / "eval.json").read_text())
    assert list(results["models"]) == list(METHODS) and results["drawn"] == 16
    # Prompts that are word for word training prompts are gone, and counted per family.
    removed = results["removed"]
    assert results["prompts"] + removed["total"] == 16 and sum(removed["by_family"].values()) == removed["total"]
    assert sum(results["families"].values()) == results["prompts"] >= 1
    for name, summary in results["models"].items():
        assert set(summary) >= {"gold_reward", "accuracy", "win_rate", "kl", "response_length", "reward"}, name
        assert 0.0 <= summary["accuracy"] <= 1.0 and summary["response_length"] > 0
        assert ("greedy_accuracy" in summary) == (name != "best_of_n"), name
        assert set(results["by_family"][name]) == set(results["families"]), name
    assert results["models"]["sft"]["kl"] == 0.0 and results["models"]["sft"]["win_rate"] == 0.5
    # Every other method's differences to SFT, with paired bootstrap intervals around them.
    assert set(results["vs_baseline"]) == set(METHODS) - {"sft"}
    for name, found in results["vs_baseline"].items():
        acc = found["all"]["accuracy"]
        assert acc["lo"] <= acc["diff"] <= acc["hi"] and acc["n"] == results["prompts"], name
        assert acc["significant"] == (acc["lo"] > 0 or acc["hi"] < 0)
        assert set(found["by_family"]) == set(results["families"]), name
    ceiling = results["pass_k"]
    assert ceiling["k"] == 2 and ceiling["model"] == "sft"
    assert results["models"]["sft"]["accuracy"] <= ceiling["all"] <= 1.0
    assert 0.0 <= results["rm_accuracy"] <= 1.0
    assert set(results["rm_accuracy_by_family"]) <= set(results["families"]) | set(removed["by_family"])
    # The pairs whose prompt is no training prompt: a part of the held-out pairs.
    assert 0 < results["rm_pairs_unseen"] <= results["rm_pairs"] and 0.0 <= results["rm_accuracy_unseen"] <= 1.0
    report = (run / "report.md").read_text()
    for name in METHODS:
        assert f"\n| {name} | " in report, name
    assert "## Differences to the baseline (sft)" in report and "## Per task family" in report
    for png in ("report_losses.png", "report_rl.png", "report_gold.png", "report_families.png"):
        assert (run / png).stat().st_size > 1000
    assert f"report: {run / 'report.md'}" in out

    third = _recipe(run)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "12 steps, 0 to run" in third.stdout

    # The evaluation at TP2 (two processes) gives the single process's numbers: the same
    # samples (generation is layout-independent), log-probs, scores and reward-model accuracy.
    config = OmegaConf.to_container(OmegaConf.load(run / "eval" / "config.yaml"))
    tp2 = tmp_path / "eval_tp2"
    config.update(run={"dir": str(tp2)}, parallel={**config["parallel"], "tp": 2},
                  eval={**config["eval"], "report": str(tp2 / "report.md")})
    run_trainer(tp2, config, world_size=2)
    again = json.loads((tp2 / "eval.json").read_text())
    for key in ("rm_accuracy", "rm_accuracy_by_family", "rm_accuracy_unseen", "pass_k", "removed", "models", "by_family", "vs_baseline"):
        assert _numbers(again[key]) == pytest.approx(_numbers(results[key]), rel=1e-4, abs=1e-4), key


def _numbers(tree: object, prefix: str = "") -> dict[str, float]:
    """A nested result as {"a/b/c": number} (pytest.approx compares flat dicts only)."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _numbers(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _numbers(sub, f"{prefix}/{i}").items()}
    return {prefix: float(tree)} if isinstance(tree, (int, float)) else {}
