"""Progress line and wandb mode decisions."""
from __future__ import annotations

import json
from pathlib import Path

from chatforge_config.trainer import WandbConfig
from trainer.metrics import MetricsLogger, format_duration, progress_line, wandb_mode


def test_progress_line_shows_tokens_per_s_and_eta() -> None:
    line = progress_line({"step": 10, "loss": 5.12345, "lr": 3e-4, "tokens_per_s": 12345.6,
                          "elapsed": 12.0}, total_steps=100, eta_s=108.0)
    assert line == "step 10/100 | loss 5.1235 | lr 3.00e-04 | 12,346 tok/s | 0:00:12 | ETA 0:01:48"


def test_format_duration() -> None:
    assert format_duration(3725) == "1:02:05"
    assert format_duration(float("nan")) == "?"


def test_wandb_is_offline_without_an_account(tmp_path: Path) -> None:
    assert wandb_mode("auto", {"HOME": str(tmp_path)}) == "offline"
    assert wandb_mode("auto", {"HOME": str(tmp_path), "WANDB_API_KEY": "x"}) == "online"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password key\n")
    assert wandb_mode("auto", {"HOME": str(tmp_path)}) == "online"
    assert wandb_mode("offline", {"HOME": str(tmp_path), "WANDB_API_KEY": "x"}) == "offline"


def test_restart_drops_lines_after_the_restart_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6))
                    + '{"step": 6, "lo')  # torn line of a killed run
    logger = MetricsLogger(tmp_path, enabled=True, logger="none", wandb_cfg=WandbConfig(),
                           config={}, total_steps=10, start_step=3)
    logger.log({"step": 4, "loss": 0.5}, steps_done_this_run=1)
    logger.close()
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    fresh = MetricsLogger(tmp_path, enabled=True, logger="none", wandb_cfg=WandbConfig(),
                          config={}, total_steps=10, start_step=0)
    fresh.close()
    assert path.read_text() == ""
