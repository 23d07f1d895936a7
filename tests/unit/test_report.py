"""The recipe report: table, RM accuracy, stages and three PNG plots from metrics files."""
from __future__ import annotations

import json
from pathlib import Path

from trainer.report import results_table, write_report

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
    results = {"prompts": 32, "baseline": "sft", "rm_accuracy": 0.8125, "models": {
        "sft": {"gold_reward": 0.25, "accuracy": 0.25, "win_rate": 0.5, "kl": 0.0, "response_length": 12.0},
        "ppo": {"gold_reward": 0.5, "accuracy": 0.5, "win_rate": 0.625, "kl": 1.5, "response_length": 9.5,
                "reward": 0.7}}}
    report = write_report(tmp_path / "report.md", results, [sft, ppo])
    text = report.read_text()
    for png in ("report_losses.png", "report_rl.png", "report_gold.png"):
        assert f"]({png})" in text
        assert (tmp_path / png).read_bytes().startswith(PNG)
    assert text.index("report_gold.png") < text.index("## Methods")  # plots at the top
    assert "| ppo | 0.500 | 0.500 | 0.625 | 1.50 | 9.5 | 0.700 |" in text
    assert "| sft | 0.250 | 0.250 | 0.500 | 0.00 | 12.0 | - |" in text
    assert "Reward model accuracy on held-out pairs: 0.812" in text
    assert "| sft | sft | 5 | 2.5000 | eval_loss 2.6000 | - |" in text  # the torn last line is skipped
    assert "| ppo | ppo | 3 | - | - | 3.0 |" in text


def test_columns_absent_from_every_method_are_left_out() -> None:
    table = results_table({"models": {"a": {"accuracy": 1.0}, "b": {"accuracy": 0.0, "kl": 0.5}}})
    assert table.splitlines()[0] == "| method | task accuracy | KL to baseline (nats) |"
    assert "| a | 1.000 | - |" in table
