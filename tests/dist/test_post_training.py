"""SFT, reward model and DPO through the real trainer: each stage at TP2 or PP2 gives the
per-step losses of one process, and each resumes exactly (stop at step 2, rerun: the same
metrics as an uninterrupted run, bit for bit). All start from one small pretrained run
(ckpt.load), which also supplies the tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import read_metrics, run_trainer, spawn_trainer
from tests.dist.test_equivalence import _merge

pytestmark = pytest.mark.dist

STEPS = 4
MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 128}
COMMON: dict[str, Any] = {
    "logger": "none",
    "seed": 11,
    "model": MODEL,
    "train": {"steps": STEPS, "global_batch": 8, "micro_batch": 2, "eval_every": 2, "eval_batches": 1},
    "optim": {"lr": 2e-3, "warmup_steps": 0},
    "data": {"embedded": {"num_chats": 300, "num_pairs": 300}},
}
# stage -> (overrides, parallel layout checked against one process)
STAGES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "sft": ({"stage": {"name": "sft"}}, {"tp": 2}),
    "rm": ({"stage": {"name": "rm"}, "model": {"head": "scalar"}}, {"pp": 2}),
    "dpo": ({"stage": {"name": "dpo"}, "dpo": {"beta": 0.5}}, {"tp": 2}),
    # The reference's log-probs computed per step rather than cached: the same numbers.
    "dpo_uncached": ({"stage": {"name": "dpo"}, "dpo": {"beta": 0.5, "precompute_ref": False}}, {"pp": 2}),
}
COMPARED = ("loss", "grad_norm", "accuracy", "eval_loss")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("pretrained")
    run_trainer(run, {"logger": "none", "model": MODEL, "tokenizer": {"vocab_size": 384},
                      "train": {"steps": 10, "eval_every": 0},
                      "optim": {"lr": 3e-3, "warmup_steps": 1}, "data": {"embedded": {"num_docs": 300}}})
    return run


def _config(stage: str, pretrained: Path) -> dict[str, Any]:
    return _merge(_merge(COMMON, STAGES[stage][0]), {"ckpt": {"load": str(pretrained)}})


def _steps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "loss" in r]


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_layout_and_exact_resume(stage: str, pretrained: Path, tmp_path: Path) -> None:
    config = _config(stage, pretrained)
    reference = run_trainer(tmp_path / "single", config)
    steps = _steps(reference)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert reference[0]["step"] == 0 and "eval_loss" in reference[0]  # baseline evaluation

    parallel = STAGES[stage][1]
    records = run_trainer(tmp_path / "parallel", _merge(config, {"parallel": parallel}), world_size=2)
    for ours, ref in zip(records, reference):
        for key in COMPARED:
            if key in ref:
                assert ours[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (stage, parallel, ours["step"], key)

    split = _merge(config, {"train": {"exit_interval": 2}})
    assert spawn_trainer(tmp_path / "split", split) == 0
    assert len(_steps(read_metrics(tmp_path / "split"))) == 2  # stopped after step 2
    assert spawn_trainer(tmp_path / "split", split) == 0
    resumed = read_metrics(tmp_path / "split")
    for ours, ref in zip(resumed, reference):
        for key in COMPARED + ("lr", "consumed_samples"):
            assert ours.get(key) == ref.get(key), (stage, ours["step"], key)
