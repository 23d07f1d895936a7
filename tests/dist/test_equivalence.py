"""The heart of the parallel tests: from the same seed (hence the same initial weights, since
init is layout-independent) and the same data, TP2, PP2, DP2 and TP2xPP2 give the per-step
losses of one process. Each layout runs the real trainer in several gloo processes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_trainer

pytestmark = pytest.mark.dist

STEPS = 6
BASE: dict[str, Any] = {
    "logger": "none",
    "seed": 7,
    # 4 layers so that PP2 puts two layers on each stage; lr high enough that the losses
    # move visibly from step to step (a wrong gradient shows up at once).
    "model": {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64},
    "train": {"steps": STEPS, "global_batch": 8, "micro_batch": 2, "eval_every": 0,
              "eval_batches": 1},
    "optim": {"lr": 3e-3, "warmup_steps": 1},
    "data": {"embedded": {"num_docs": 400}},
    "tokenizer": {"vocab_size": 384},
}

# LLaMA's choices on the same tiny scale: rotary positions, RMSNorm, SwiGLU, no biases,
# untied output layer, grouped-query attention (2 KV groups for 4 heads).
LLAMA: dict[str, Any] = {"model": {
    "position_embedding": "rope", "normalization": "RMSNorm", "activation": "swiglu",
    "add_bias": False, "tie_embeddings": False, "num_query_groups": 2}}

# name -> (model family, processes, overrides)
# TP2 alone is the TP path of recompute_selective_tp2 below, PP2 alone (4 microbatches of 2
# per step) the PP path of tp2pp2; both alone also train from a TP2xPP2 checkpoint to its
# losses in test_checkpoint.py (reshard to tp2pp1 and tp1pp2), so they have no run here.
LAYOUTS = {
    "dp2": ("gpt", 2, {}),
    "tp2pp2": ("gpt", 4, {"parallel": {"tp": 2, "pp": 2}}),
    "dp2_distopt": ("gpt", 2, {"parallel": {"distributed_optimizer": True}}),
    "llama_tp2pp2": ("llama", 4, {"parallel": {"tp": 2, "pp": 2}}),
    # Recomputation trades memory for compute and must not change the numbers.
    "recompute_full": ("gpt", 1, {"parallel": {"recompute": "full"}}),
    "recompute_selective_tp2": ("gpt", 2, {"parallel": {"recompute": "selective", "tp": 2}}),
}
FAMILIES = {"gpt": {}, "llama": LLAMA}


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Single-process runs, one per model family, made when first needed."""
    return {}


def _reference(family: str, cache: dict[str, list[dict[str, Any]]], root: Path) -> list[dict[str, Any]]:
    if family not in cache:
        records = run_trainer(root / f"single_{family}", _merge(BASE, FAMILIES[family]), world_size=1)
        assert len(records) == STEPS
        # The reference must itself be a training run: the loss has to move.
        assert records[-1]["loss"] < records[0]["loss"] - 0.05
        cache[family] = records
    return cache[family]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name: str, references: dict[str, list[dict[str, Any]]],
                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    family, world, extra = LAYOUTS[name]
    root = tmp_path_factory.getbasetemp()
    reference = _reference(family, references, root)
    config = _merge(_merge(BASE, FAMILIES[family]), extra)
    records = run_trainer(root / name, config, world_size=world)
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for ours, ref in zip(records, reference):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-4), (name, ours["step"])
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-3), (name, ours["step"])
