"""Batched sampling with a KV cache on the parallel model (trainer/generation.py over
parallel/inference.py).

One launch of two gloo processes runs every layout in turn (tests/dist/generation_worker.py):
TP1 (as two DP replicas), TP2 and PP2, each with a GPT and a
LLaMA-style model (RoPE, RMSNorm, SwiGLU, GQA with 2 groups), on prompts of different
lengths. The cache must give the tokens of the no-cache recomputation, every layout the
tokens of TP1, and every rank of a replica the same result. The pure sampling functions
are checked in this process.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import REPO
from tests.dist.generation_worker import FAMILIES, MAX_NEW, PROMPTS

pytestmark = pytest.mark.dist

LAYOUTS = ("dp", "tp2", "pp2")
WORLD = 2
CASES = ("greedy_cache", "greedy_nocache", "sampled_cache", "sampled_nocache")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """layout -> per-rank results of the one launch."""
    from launcher.local import run_local

    out = tmp_path_factory.mktemp("generation")
    code = run_local([sys.executable, "-m", "tests.dist.generation_worker", str(out), *LAYOUTS],
                     WORLD, out, env_extra={"PYTHONPATH": str(REPO)}, threads=1)
    assert code == 0, f"generation worker failed with exit code {code}; see {out}/logs"
    return {layout: [json.loads((out / f"{layout}_rank{r}.json").read_text()) for r in range(WORLD)]
            for layout in LAYOUTS}


def _reference(results: dict[str, list[dict[str, Any]]], family: str) -> dict[str, Any]:
    """TP1 with the full batch: DP replica 0 of the dp layout."""
    return results["dp"][0][family]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cache_matches_recompute_at_every_layout(results: dict[str, list[dict[str, Any]]], family: str) -> None:
    for layout, ranks in results.items():
        for rank, got in enumerate(ranks):
            run = got[family]
            for kind in ("greedy", "sampled"):
                cached, recomputed = run[f"{kind}_cache"], run[f"{kind}_nocache"]
                where = f"{layout} rank {rank} {family} {kind}"
                assert cached["tokens"] == recomputed["tokens"], where
                for a, b in zip(cached["logprobs"], recomputed["logprobs"]):
                    assert a == pytest.approx(b, abs=1e-4), where
            greedy = run["greedy_cache"]
            assert [len(t) for t in greedy["tokens"]] == [MAX_NEW] * len(greedy["tokens"])
            assert not any(greedy["finished"])  # no stop ids: every row runs out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_layout_generates_what_tp1_generates(results: dict[str, list[dict[str, Any]]],
                                                    family: str) -> None:
    """Greedy and sampled (temperature 0.8, top-k 20, top-p 0.9, fixed seed) tokens equal
    TP1's at TP2 and PP2 on every rank, log-probs to float tolerance. The second
    DP replica had only the first two prompts: its greedy rows equal those of the full batch
    (left padding and per-row positions make a row independent of its batch)."""
    ref = _reference(results, family)
    for layout, ranks in results.items():
        for rank, got in enumerate(ranks):
            run, where = got[family], f"{layout} rank {rank} {family}"
            rows = len(PROMPTS) if run["dp_rank"] == 0 else 2
            for case in CASES:
                if case.startswith("sampled") and rows != len(PROMPTS):
                    continue  # a smaller batch draws a different random stream
                assert run[case]["tokens"] == ref[case]["tokens"][:rows], f"{where} {case}"
                for a, b in zip(run[case]["logprobs"], ref[case]["logprobs"]):
                    assert a == pytest.approx(b, abs=1e-4), f"{where} {case}"
            assert run["sp_restored"], where
    # Sampling really samples: not the greedy tokens.
    assert ref["sampled_cache"]["tokens"] != ref["greedy_cache"]["tokens"]


def test_a_prompt_alone_gets_its_batch_row(results: dict[str, list[dict[str, Any]]]) -> None:
    ref = _reference(results, "gpt")
    alone = [single["tokens"][0] for single in ref["singles"]]
    assert alone == ref["greedy_cache"]["tokens"]


def test_stop_ids_end_rows_individually(results: dict[str, list[dict[str, Any]]]) -> None:
    ref = _reference(results, "gpt")
    stop = set(ref["stop_ids"])
    stopped = ref["stopped"]
    for row, full in enumerate(ref["greedy_cache"]["tokens"]):
        hits = [i for i, token in enumerate(full) if token in stop]
        expected = full[: hits[0] + 1] if hits else full
        assert stopped["tokens"][row] == expected, row
        assert stopped["finished"][row] == bool(hits), row
        assert len(stopped["logprobs"][row]) == len(expected)
    assert stopped["tokens"][1] == ref["greedy_cache"]["tokens"][1][:1]  # stopped on its first
    assert not all(stopped["finished"])  # the others ran on


def test_too_long_names_seq_length(results: dict[str, list[dict[str, Any]]]) -> None:
    message = _reference(results, "gpt")["too_long"]
    assert "model.seq_length=128" in message and "129" in message, message


# -- the pure sampling functions (no processes) -------------------------------------------
def test_filter_logits_top_k_and_top_p() -> None:
    from trainer.generation import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda scores: torch.isfinite(scores)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, 1.0, 2, 1.0)) == [True, True, False, False]
    # Nucleus 0.8: 0.5 + 0.3 reaches it, the rest goes.
    assert kept(filter_logits(logits, 1.0, 0, 0.8)) == [True, True, False, False]
    assert kept(filter_logits(logits, 1.0, 0, 0.81)) == [True, True, True, False]
    assert kept(filter_logits(logits, 1.0, 0, 0.1)) == [True, False, False, False]


def test_sample_tokens_inverse_cdf_and_greedy() -> None:
    from trainer.generation import SamplingConfig, check_sampling, sample_tokens

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4, 4)
    uniforms = torch.tensor([0.0, 0.49, 0.51, 0.999], dtype=torch.float64)
    drawn = sample_tokens(logits, SamplingConfig(temperature=1.0), uniforms)
    assert drawn.tolist() == [0, 0, 1, 3]
    assert sample_tokens(logits, SamplingConfig(temperature=0.0), None).tolist() == [0] * 4
    with pytest.raises(ValueError, match="sampling.top_p=0"):
        check_sampling(SamplingConfig(top_p=0.0))


def test_training_after_inference_mode_generation_finds_no_inference_tensors() -> None:
    """Decode steps run under torch.inference_mode; the RoPE tables megatron memoised during
    them are dropped when generation ends, and training steps follow (inference_mode_worker)."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "tests.dist.inference_mode_worker"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-3000:] + proc.stderr[-3000:]
