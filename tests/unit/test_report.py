"""The recipe report: tables (methods, differences with intervals, families, RM accuracy, stages)
and four PNG plots from the eval results and metrics files."""
from __future__ import annotations

import json
from pathlib import Path

from trainer.report import differences_table, results_table, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _run(root: Path, name: str, stage: str, records: list[dict]) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"stage:\n  name: {stage}\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "lo')
    return run


def test_report_has_the_table_the_plots_and_every_stage(tmp_path: Path) -> None:
    sft = _run(tmp_path, "sft", "sft", [{"step": s, "loss": 3.0 - s / 10} for s in range(1, 6)]
               + [{"step": 5, "eval_loss": 2.6}])
    ppo = _run(tmp_path, "ppo", "ppo", [{"step": s, "reward": 0.1 * s, "kl": 0.05 * s, "elapsed": 60.0 * s}
                                        for s in range(1, 4)])
    ci = {"diff": 0.25, "lo": 0.0625, "hi": 0.4375, "n": 32, "significant": True}
    ns = {"diff": -2.5, "lo": -5.0, "hi": 0.5, "n": 32, "significant": False}
    results = {"prompts": 32, "drawn": 40, "removed": {"total": 8, "by_family": {"add": 5, "reverse": 3}},
               "baseline": "sft", "rm_accuracy": 0.8125, "rm_pairs": 64,
               "rm_accuracy_unseen": 0.625, "rm_pairs_unseen": 24,
               "rm_accuracy_by_family": {"add": {"accuracy": 0.9, "pairs": 30}, "reverse": {"accuracy": 0.75, "pairs": 34}},
               "pass_k": {"k": 8, "model": "sft", "all": 0.75, "by_family": {"add": 0.5, "reverse": 1.0}},
               "bootstrap": {"resamples": 2000, "seed": 1234, "level": 0.95},
               "models": {
        "sft": {"gold_reward": 0.25, "accuracy": 0.25, "greedy_accuracy": 0.375, "win_rate": 0.5, "kl": 0.0,
                "response_length": 12.0},
        "ppo": {"gold_reward": 0.5, "accuracy": 0.5, "greedy_accuracy": 0.5, "win_rate": 0.625, "kl": 1.5,
                "response_length": 9.5, "reward": 0.7}},
               "by_family": {
        "sft": {"add": {"accuracy": 0.25, "accuracy_ci": [0.1, 0.4], "kl": 0.0, "prompts": 16},
                "reverse": {"accuracy": 0.25, "accuracy_ci": [0.1, 0.4], "kl": 0.0, "prompts": 16}},
        "ppo": {"add": {"accuracy": 0.375, "accuracy_ci": [0.2, 0.6], "greedy_accuracy": 0.5, "kl": 1.0,
                        "response_length": 9.0, "prompts": 16},
                "reverse": {"accuracy": 0.625, "accuracy_ci": [0.4, 0.8], "kl": 2.0, "prompts": 16}}},
               "vs_baseline": {"ppo": {"all": {"accuracy": ci, "response_length": ns},
                                       "by_family": {"add": {"accuracy": {**ci, "diff": 0.125}},
                                                     "reverse": {"accuracy": {**ci, "diff": 0.375}}}}}}
    report = write_report(tmp_path / "report.md", results, [sft, ppo])
    text = report.read_text()
    for png in ("report_losses.png", "report_rl.png", "report_gold.png", "report_families.png"):
        assert f"]({png})" in text
        assert (tmp_path / png).read_bytes().startswith(PNG)
    assert text.index("report_families.png") < text.index("## Methods")  # plots at the top
    assert "40 evaluation prompts drawn; 8 removed as word-for-word training prompts (add 5, reverse 3); " \
           "32 evaluated." in text
    assert "| ppo | 0.500 | 0.500 | 0.500 | 0.625 | 1.50 | 9.5 | 0.700 |" in text
    assert "| sft | 0.250 | 0.250 | 0.375 | 0.500 | 0.00 | 12.0 | - |" in text
    assert "Oracle pass@8 of sft" in text and "): 0.750" in text
    assert "Reward model accuracy on held-out pairs: 0.812 (64 pairs, clean labels)" in text
    assert "On the 24 of them whose prompt is no training prompt (as the evaluation prompts): 0.625" in text
    assert "| accuracy | 0.900 | 0.750 |" in text and "| pairs | 30 | 34 |" in text
    # Differences with their intervals; "not significant" where the interval holds 0.
    assert "| ppo | +0.250 [+0.062, +0.438] | -2.5 [-5.0, +0.5] not significant |" in text
    # Per family: the ceiling, the removed prompts, the share of headroom (0.125 / (0.5 - 0.25)).
    assert "### add: 16 prompts (5 removed as training prompts); oracle pass@8 of sft: 0.500" in text
    assert "| ppo | 0.375 | +0.125 [+0.062, +0.438] | +0.50 | 0.500 | - | 1.00 | 9.0 |" in text
    assert "| ppo | 0.625 | +0.375 [+0.062, +0.438] | +0.50 | - | - | 2.00 | - |" in text  # reverse: 0.375 / 0.75
    assert "| sft | sft | 5 | 2.5000 | eval_loss 2.6000 | - |" in text  # the torn last line is skipped
    few = differences_table({"vs_baseline": {"dpo": {"all": {"accuracy": {**ci, "n": 3}}}}})
    assert "| dpo | +0.250 (n=3: too few prompts for an interval) |" in few
    assert "| ppo | ppo | 3 | - | - | 3.0 |" in text


def test_columns_absent_from_every_method_are_left_out() -> None:
    table = results_table({"models": {"a": {"accuracy": 1.0}, "b": {"accuracy": 0.0, "kl": 0.5}}})
    assert table.splitlines()[0] == "| method | pass@1 sampled | KL to baseline (nats) |"
    assert "| a | 1.000 | - |" in table
