"""LoRA through the real trainer (docs/lora.md). One small pretrained run is the base; SFT
with adapters on it runs in `python -m tests.dist.test_lora CONFIG OUT`, a worker that
trains with the real loop and then, in the same processes, inspects what it trained:

- the base weights are bit-identical to the checkpoint they came from; every adapter moved
  (B started at zero); the checkpoint holds the adapters and their optimizer state only;
- the merged model (merged on load, as every other stage loads it, merged in place, and
  exported to Hugging Face by tools.hf_export) gives the unmerged model's logits;
- TP2 with full recomputation gives TP1's losses and logits;
- a stopped and rerun LoRA run continues exactly (base from ckpt.load, adapters and
  optimizer from its own checkpoint);
- DPO with adapters on top of the LoRA SFT run: its base is the SFT run merged, its
  reference that base (adapters off), so the step-0 margin is 0."""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import REPO, read_metrics, run_trainer, spawn_trainer, write_config
from tests.dist.test_equivalence import _merge

pytestmark = pytest.mark.dist

MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64}
STEPS = 4
SFT: dict[str, Any] = {
    "logger": "none", "seed": 11, "model": MODEL, "stage": {"name": "sft"},
    "train": {"steps": STEPS, "global_batch": 8, "micro_batch": 2, "eval_every": 2, "eval_batches": 1},
    "optim": {"lr": 2e-3, "warmup_steps": 0},
    "data": {"embedded": {"num_chats": 300, "num_pairs": 300}},
    "lora": {"rank": 4, "alpha": 8.0},
}
TP2 = {"parallel": {"tp": 2, "recompute": "full"}}
ADAPTERS = 2 * 4 * 2  # layers x targets x (A, B)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lora")
    run_trainer(root / "pre", {"logger": "none", "model": MODEL, "tokenizer": {"vocab_size": 384},
                               "train": {"steps": 10, "eval_every": 0}, "optim": {"lr": 3e-3, "warmup_steps": 1},
                               "data": {"embedded": {"num_docs": 300}}})
    sft = _merge(SFT, {"ckpt": {"load": str(root / "pre")}})
    jobs = {"tp1": (sft, 1), "tp2": (_merge(sft, TP2), 2)}
    with ThreadPoolExecutor(2) as pool:  # the two layouts at once: both are mostly start-up
        outs = dict(zip(jobs, pool.map(lambda item: _worker(root / item[0], *item[1]), jobs.items())))
    return {"root": root, "sft": sft, **outs}


def _worker(run_dir: Path, config: dict[str, Any], world: int) -> dict[str, Any]:
    from launcher.local import run_local

    path = write_config(run_dir, config)
    out = run_dir / "inspect.pt"
    code = run_local([sys.executable, "-m", "tests.dist.test_lora", str(path), str(out)], world, run_dir,
                     env_extra={"PYTHONPATH": str(REPO)}, threads=1)
    assert code == 0, f"worker failed; see {run_dir}/logs"
    return {**torch.load(out), "records": read_metrics(run_dir), "dir": run_dir}


def test_only_adapters_train_and_are_saved(work: dict[str, Any]) -> None:
    tp1 = work["tp1"]
    report = tp1["report"]
    assert report["base_names_match"] and report["base_max_diff"] == 0.0  # bit-identical base
    assert report["adapters"] == ADAPTERS and report["adapters_moved"] == ADAPTERS
    assert report["b_init_max"] == 0.0 and report["b_max"] > 0.0
    # Per layer r x (in + out): qkv 4 x (64 + 192), proj 4 x 128, fc1 4 x (64 + 256), fc2 4 x (256 + 64).
    first = tp1["records"][0]
    assert first["trainable_params"] == 2 * 4 * (256 + 128 + 320 + 320) == 8192
    assert first["total_params"] == report["total_params"] > 100_000
    assert "params 8,192 trainable of" in (tp1["dir"] / "logs" / "rank_0.log").read_text()
    step_dir = tp1["dir"] / "checkpoints" / f"step_{STEPS:06d}"
    from torch.distributed.checkpoint import FileSystemReader

    keys = list(FileSystemReader(str(step_dir / "shards")).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if ".optimizer." not in k]
    assert len(model_keys) == 8 and all(k.endswith((".lora_a", ".lora_b")) for k in model_keys), model_keys
    assert all(k.endswith((".lora_a", ".lora_b")) for k in keys), keys  # optimizer state: adapters only
    from trainer.lora_checkpoint import lora_records

    base = lora_records(step_dir)["model"]["base"]
    assert Path(base["dir"]) == (work["root"] / "pre" / "checkpoints" / "step_000010").resolve()


def test_merged_model_equals_unmerged(work: dict[str, Any]) -> None:
    for layout in ("tp1", "tp2"):
        out = work[layout]
        assert (out["unmerged"] - out["base_logits"]).abs().max() > 1e-3  # the adapters matter
        torch.testing.assert_close(out["merged_on_load"], out["unmerged"], rtol=0, atol=1e-5)
        torch.testing.assert_close(out["merged_in_place"], out["unmerged"], rtol=0, atol=1e-5)


def test_hugging_face_export_is_the_merged_model(work: dict[str, Any]) -> None:
    """tools.hf_export on the LoRA run: transformers' logits are the unmerged model's."""
    import subprocess

    from transformers import AutoModelForCausalLM

    out = work["root"] / "hf"
    proc = subprocess.run([sys.executable, "-m", "tools.hf_export", str(work["tp1"]["dir"]), str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    vocab = model.config.vocab_size  # the tokenizer's: the export cuts chatforge's padding
    unmerged = work["tp1"]["unmerged"][..., :vocab]
    seq = unmerged.shape[1]
    tokens = (torch.arange(2 * (seq + 1)).view(2, seq + 1) * 7 + 3) % vocab  # as _logits
    with torch.no_grad():
        theirs = model(tokens[:, :-1]).logits
    torch.testing.assert_close(theirs, unmerged, rtol=0, atol=1e-5)  # measured 4e-7


def test_tp2_with_full_recompute_matches_tp1(work: dict[str, Any]) -> None:
    one, two = work["tp1"]["records"], work["tp2"]["records"]
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(STEPS + 1))
    assert one[-1]["loss"] < one[1]["loss"]  # it trains
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    torch.testing.assert_close(work["tp2"]["unmerged"], work["tp1"]["unmerged"], rtol=0, atol=1e-4)


def test_stopped_lora_run_resumes_exactly(work: dict[str, Any]) -> None:
    split = _merge(work["sft"], {"train": {"exit_interval": 2}})
    run_dir = work["root"] / "split"
    assert spawn_trainer(run_dir, split) == 0
    assert spawn_trainer(run_dir, split) == 0
    assert "continuing at step 2" in (run_dir / "logs" / "rank_0.log").read_text()
    for ours, ref in zip(read_metrics(run_dir), work["tp1"]["records"], strict=True):
        for key in ("loss", "grad_norm", "lr", "eval_loss"):
            assert ours.get(key) == ref.get(key), (ours["step"], key)


def test_dpo_with_adapters_on_a_lora_sft_run(work: dict[str, Any]) -> None:
    dpo = _merge(SFT, {"stage": {"name": "dpo"}, "dpo": {"beta": 0.5}, "ckpt": {"load": str(work["tp1"]["dir"])},
                       "train": {"steps": 2, "eval_every": 2}})
    records = run_trainer(work["root"] / "dpo", dpo)
    first, last = records[0], records[-1]
    # The reference is the policy's base (the SFT run, merged), adapters off: equal at step 0.
    assert first["eval_margin"] == pytest.approx(0.0, abs=1e-6)
    assert first["trainable_params"] == 8192 and first["total_params"] > 100_000
    # The adapters learn: the held-out DPO loss (the same pairs at both evaluations) falls.
    assert last["eval_margin"] != 0.0 and last["eval_loss"] < first["eval_loss"]
    from trainer.lora_checkpoint import lora_records

    base = lora_records(work["root"] / "dpo" / "checkpoints" / "step_000002")["model"]["base"]
    assert Path(base["dir"]).parent == (work["tp1"]["dir"] / "checkpoints").resolve()


# ---- the worker: python -m tests.dist.test_lora CONFIG OUT ------------------------------------

def _logits(engine: Any, ctx: Any) -> torch.Tensor:
    """Full-vocabulary logits [2, S, V] of a fixed batch (every pipeline rank gets them)."""
    from trainer.batches import lm_inputs
    from trainer.losses import outputs_only

    seq = int(ctx.cfg.model.seq_length)
    tokens = (torch.arange(2 * (seq + 1)).view(2, seq + 1) * 7 + 3) % engine.vocab_size

    def step(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> Any:
        x = lm_inputs(batch["tokens"], ctx.device)
        logits = model(x["input_ids"], x["position_ids"], x["attention_mask"], runtime_gather_output=True)
        return logits, lambda output: outputs_only(output, logits=output.detach().float())

    return engine.forward_outputs([{"tokens": tokens}], step)[0]["logits"]


def _max(value: float) -> float:
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _inspect(ctx: Any, engine: Any) -> dict[str, Any]:
    """The trained engine against its base checkpoint and its own initial adapters."""
    from parallel.engine import Engine
    from parallel.lora import is_adapter_key
    from trainer.checkpointing import load_weights

    cfg = ctx.cfg
    base = Engine(cfg.model, cfg.parallel, ctx.topo, engine.vocab_size, seed=999)
    load_weights(cfg.ckpt.load, {"model": base}, cfg.model)
    fresh = Engine(cfg.model, cfg.parallel, ctx.topo, engine.vocab_size, seed=int(cfg.seed), optim=cfg.optim,
                   lora=cfg.lora)
    trained, start = dict(engine.module.named_parameters()), dict(fresh.module.named_parameters())
    frozen = dict(base.module.named_parameters())
    adapters = [n for n in trained if is_adapter_key(n)]
    report = {
        "base_names_match": sorted(frozen) == sorted(n for n in trained if not is_adapter_key(n)),
        "base_max_diff": _max(max(float((trained[n] - p).detach().abs().max()) for n, p in frozen.items())),
        "adapters": len(adapters),
        "adapters_moved": len([n for n in adapters if not torch.equal(trained[n], start[n])]),
        "b_init_max": _max(max(float(start[n].detach().abs().max()) for n in adapters if n.endswith("lora_b"))),
        "b_max": _max(max(float(trained[n].detach().abs().max()) for n in adapters if n.endswith("lora_b"))),
        "total_params": engine.parameter_count(),
    }
    return {"report": report, "base_logits": _logits(base, ctx)}


def _main(config_path: str, out: str) -> None:
    from parallel.engine import Engine
    from parallel.lora import merge_adapters
    from trainer import runtime
    from trainer.checkpointing import load_weights
    from trainer.loop import run
    from trainer.stages import build_stage

    cfg = runtime.load_config(config_path)
    ctx = runtime.start(cfg)
    stage = build_stage(ctx)
    assert run(ctx, stage) == 0
    engine = stage.engine
    result = _inspect(ctx, engine)
    result["unmerged"] = _logits(engine, ctx)
    merged = Engine(cfg.model, cfg.parallel, ctx.topo, engine.vocab_size, seed=998)  # plain, frozen
    load_weights(cfg.run.dir, {"model": merged}, cfg.model)  # base + adapters folded in on load
    result["merged_on_load"] = _logits(merged, ctx)
    assert merge_adapters(engine.module) == 2 * 4
    result["merged_in_place"] = _logits(engine, ctx)
    if ctx.env.rank == 0:
        torch.save(result, out)
    runtime.close(ctx)


if __name__ == "__main__":
    _main(*sys.argv[1:3])
