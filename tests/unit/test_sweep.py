"""Sweeps with cluster=local: every point runs even when one fails; the summary table marks
the best point, shows the failure's traceback, and the exit status is non-zero."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.sweep import PointResult, best_point, summary_text

REPO = Path(__file__).resolve().parents[2]
CHATFORGE = Path(sys.executable).parent / "chatforge"

# A stand-in trainer: logs three steps whose loss is 10 x lr, and raises for lr = 0.5.
FAKE_MAIN = """
import json, os, sys
from omegaconf import OmegaConf
cfg = OmegaConf.load(sys.argv[1])
lr = float(cfg.optim.lr)
with open(os.path.join(cfg.run.dir, "metrics.jsonl"), "w") as out:
    for step in (1, 2, 3):
        out.write(json.dumps({"step": step, "loss": 10 * lr + 1 / step}) + "\\n")
    out.write(json.dumps({"step": 3, "eval_loss": 10 * lr}) + "\\n")
if lr == 0.5:
    raise ValueError("learning rate 0.5 diverged")
"""


@pytest.fixture
def fake_trainer(tmp_path: Path) -> dict[str, str]:
    package = tmp_path / "fake" / "trainer"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"__path__.append({str(REPO / 'trainer')!r})\n")
    (package / "__main__.py").write_text(FAKE_MAIN)
    return {"PYTHONPATH": str(tmp_path / "fake")}


def test_local_sweep_with_a_failing_point(tmp_path: Path, fake_trainer: dict[str, str]) -> None:
    proc = subprocess.run([str(CHATFORGE), "-m", "optim.lr=0.25,0.5,0.125", "run.dir=sweep"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **fake_trainer})
    assert proc.returncode == 1, proc.stderr
    sweep = tmp_path / "sweep"
    for num in (0, 1, 2):  # the failure at point 1 did not stop point 2
        assert (sweep / str(num) / "metrics.jsonl").exists()
    summary = (sweep / "summary.md").read_text()
    assert "| 2 **best** | optim.lr=0.125 | ok | 3 |" in summary, summary
    assert "### point 1 failed (optim.lr=0.5)" in summary
    assert "ValueError: learning rate 0.5 diverged" in summary
    assert "Traceback (most recent call last)" in summary
    assert "sweep summary" in proc.stdout and "1 of 3 sweep points failed: 1" in proc.stderr
    records = json.loads((sweep / "summary.json").read_text())
    assert [r["ok"] for r in records] == [True, False, True]
    assert [r["best"] for r in records] == [False, False, True]
    assert records[0]["eval_loss"] == 2.5 and records[0]["loss"] == pytest.approx(2.5 + 1 / 3)


def test_best_point_prefers_eval_loss_and_skips_failures(tmp_path: Path) -> None:
    def point(num: int, code: int, **metrics: float) -> PointResult:
        p = PointResult(num, [f"x={num}"], tmp_path / str(num), tmp_path, code=code)
        p.metrics = dict(metrics)
        return p

    points = [point(0, 0, loss=1.0, eval_loss=3.0), point(1, 0, loss=2.0, eval_loss=2.0),
              point(2, 1, loss=0.1, eval_loss=0.1)]
    assert best_point(points) == 1
    assert best_point([points[2]]) is None
    text = summary_text(points)
    assert "| 1 **best** |" in text and "failed (exit 1)" in text
