"""tools/seed_spread.py: the difference to the baseline per seed, its mean and t interval."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tools import seed_spread


def _eval(run: Path, sft: float, ppo: float, fam: dict[str, tuple[float, float]], kl: float = 1.0) -> None:
    """One run's eval.json; "pretrain" is the same in every run (the seed never reached it)."""
    (run / "eval").mkdir(parents=True)
    by_family = {m: {f: {"accuracy": v[i]} for f, v in fam.items()} for i, m in enumerate(("sft", "ppo"))}
    (run / "eval" / "eval.json").write_text(json.dumps({
        "baseline": "sft", "models": {"sft": {"accuracy": sft}, "ppo": {"accuracy": ppo, "kl": kl}, "pretrain": {"accuracy": 0.0}},
        "by_family": by_family}))


def test_spread_mean_interval_and_files(tmp_path: Path) -> None:
    runs = []
    for i, (ppo, rev) in enumerate(((0.30, 0.9), (0.32, 0.8), (0.28, 0.7))):
        run = tmp_path / f"s{i}"
        _eval(run, 0.20, ppo, {"add": (0.1, 0.1), "reverse": (0.5, rev)})
        runs.append(run)
    seed_spread.main([str(r) for r in runs] + ["--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "seed_spread.json").read_text())
    d = result["methods"]["ppo"]["diff"]
    assert d["runs"] == pytest.approx([0.10, 0.12, 0.08])
    assert d["mean"] == pytest.approx(0.10) and d["sd"] == pytest.approx(0.02)
    half = 4.303 * 0.02 / math.sqrt(3)
    assert (d["lo"], d["hi"]) == pytest.approx((0.10 - half, 0.10 + half)) and d["significant"]
    fam = result["methods"]["ppo"]["by_family"]
    assert fam["add"]["mean"] == pytest.approx(0.0) and fam["reverse"]["mean"] == pytest.approx(0.3)
    md = (tmp_path / "out" / "seed_spread.md").read_text()
    assert "| ppo | 0.300 / 0.320 / 0.280 |" in md and "not significant" not in md
    assert (tmp_path / "out" / "seed_spread.png").stat().st_size > 1000


def test_a_spread_that_straddles_zero_is_not_significant(tmp_path: Path) -> None:
    runs = []
    for i, ppo in enumerate((0.25, 0.15, 0.22)):
        _eval(tmp_path / f"s{i}", 0.20, ppo, {"add": (0.1, 0.1)})
        runs.append(tmp_path / f"s{i}")
    result = seed_spread.spread([seed_spread.load(r) for r in runs])
    assert not result["methods"]["ppo"]["diff"]["significant"]
    assert list(result["methods"]) == ["ppo"]
    assert "not significant" in seed_spread.markdown(result)


def test_a_trained_method_with_equal_accuracy_in_every_run_is_kept(tmp_path: Path) -> None:
    """Only a model whose whole summary repeats (the shared pretrained one) is left out."""
    runs = []
    for i, kl in enumerate((1.0, 2.0, 3.0)):
        _eval(tmp_path / f"s{i}", 0.20, 0.25, {"add": (0.1, 0.1)}, kl=kl)
        runs.append(tmp_path / f"s{i}")
    result = seed_spread.spread([seed_spread.load(r) for r in runs])
    assert list(result["methods"]) == ["ppo"]
    assert result["methods"]["ppo"]["diff"]["mean"] == pytest.approx(0.05)


def test_missing_eval_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="eval.json does not exist"):
        seed_spread.load(tmp_path / "nothing")
