"""LoRA and the memory savers without the trainer: the adapter maths on megatron's layers
(one process, in a subprocess: megatron keeps global state), the launcher's memory plan
against hand calculations, and the config checks."""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from chatforge_config.trainer import Config
from launcher.cli import preflight
from launcher.plan import lora_params_per_device, memory_per_device
from launcher.validate import find_errors
from tests.conftest import REPO

PROBE = r"""
import json, torch, torch.nn.functional as F
from chatforge_config.parallel import LoRAConfig, ModelConfig, OptimConfig, ParallelConfig
from parallel import cpu_compat
from parallel.dist import init_distributed, local_env
from parallel.groups import init_groups
init_distributed(local_env()); cpu_compat.apply()
from parallel.checkpoint import model_state
from parallel.engine import Engine
from parallel.lora import adapters_disabled, is_adapter_key, merge_adapters, swapped_adapters
from trainer.batches import lm_inputs

out = {}
mc = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, activation="swiglu", seq_length=16)
pc = ParallelConfig()
topo = init_groups(mc, pc, 1)
lora = LoRAConfig(rank=4, alpha=8.0, targets="linear_qkv,linear_fc1,linear_fc2")
plain = Engine(mc, pc, topo, vocab_size=300, seed=1)
eng = Engine(mc, pc, topo, vocab_size=300, seed=1, optim=OptimConfig(lr=1e-2, warmup_steps=0), lora=lora)
x = lm_inputs(torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0)), torch.device("cpu"))

def fwd(module):
    with torch.no_grad():
        return module(x["input_ids"], x["position_ids"], x["attention_mask"])

params = dict(eng.module.named_parameters())
out["fresh_is_base"] = torch.equal(fwd(eng.module), fwd(plain.module))
out["a_bound"] = max(float(p.abs().max()) for n, p in params.items() if n.endswith("lora_a"))
out["trainable"] = sorted({n.split(".", 3)[-1] for n, p in params.items() if p.requires_grad})
out["frozen_without_grad_buffer"] = all(not hasattr(p, "main_grad") for p in params.values() if not p.requires_grad)
out["optimizer_numel"] = sum(p.numel() for g in eng.optimizer.param_groups for p in g["params"])
out["trainable_count"] = eng.parameter_count(trainable_only=True)
with torch.no_grad():  # random B: the hook must add (alpha / r) B A x
    for n, p in params.items():
        if n.endswith("lora_b"):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
fc1 = eng.module.decoder.layers[0].mlp.linear_fc1
h = torch.randn(5, 2, 64, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    got, _ = fc1(h)
    want = F.linear(h, fc1.weight, fc1.bias) + 2.0 * F.linear(F.linear(h, fc1.lora_a), fc1.lora_b)
out["hook_error"] = float((got - want).abs().max())
adapted = fwd(eng.module)
out["adapted_differs"] = float((adapted - fwd(plain.module)).abs().max())
with adapters_disabled(eng.module):
    out["disabled_is_base"] = torch.equal(fwd(eng.module), fwd(plain.module))
own = {n: p for n, p in eng.module.named_parameters() if is_adapter_key(n)}
with swapped_adapters(eng.module, LoRAConfig(rank=2, targets="linear_proj")):
    out["swapped_in"] = sorted({".".join(n.split(".")[-2:]) for n, _ in eng.module.named_parameters()
                                if is_adapter_key(n)})
back = {n: p for n, p in eng.module.named_parameters() if is_adapter_key(n)}
out["own_back"] = back.keys() == own.keys() and all(back[n] is own[n] for n in own)
out["own_back_output"] = torch.equal(fwd(eng.module), adapted)
trained = model_state(eng, "trained")
out["trained_keys"] = sorted({v.key for v in trained.values()})
out["fc1_b_saved_as"] = type(trained["decoder.layers.0.mlp.linear_fc1.lora_b"]).__name__
out["base_part_has_adapters"] = any(is_adapter_key(k) for k in model_state(eng, "base"))
out["merged_layers"] = merge_adapters(eng.module)
out["merge_error"] = float((fwd(eng.module) - adapted).abs().max())
out["adapters_left"] = [n for n, _ in eng.module.named_parameters() if is_adapter_key(n)]
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe() -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_fresh_adapters_change_nothing_and_only_adapters_train(probe: dict[str, Any]) -> None:
    assert probe["fresh_is_base"]  # B = 0
    assert 0.0 < probe["a_bound"] <= 1 / 8  # kaiming-uniform: |A| <= 1/sqrt(fan_in), fan_in >= 64
    assert probe["trainable"] == ["mlp.linear_fc1.lora_a", "mlp.linear_fc1.lora_b", "mlp.linear_fc2.lora_a",
                                  "mlp.linear_fc2.lora_b", "self_attention.linear_qkv.lora_a",
                                  "self_attention.linear_qkv.lora_b"]
    assert probe["frozen_without_grad_buffer"]
    # Per layer r x (in + out): qkv 4 x (64 + 192), fc1 (SwiGLU: 2 x 192 out) 4 x (64 + 384),
    # fc2 4 x (192 + 64); two layers.
    expected = 2 * 4 * ((64 + 192) + (64 + 384) + (192 + 64))
    assert probe["trainable_count"] == probe["optimizer_numel"] == expected


def test_hook_adds_the_scaled_low_rank_path(probe: dict[str, Any]) -> None:
    assert probe["hook_error"] < 1e-6  # W x + b + (alpha / r) B A x with alpha / r = 2
    assert probe["adapted_differs"] > 1e-3
    assert probe["disabled_is_base"]


def test_swapped_adapters_come_and_go(probe: dict[str, Any]) -> None:
    assert probe["swapped_in"] == ["linear_proj.lora_a", "linear_proj.lora_b"]
    assert probe["own_back"] and probe["own_back_output"]


def test_checkpoint_parts_and_merge(probe: dict[str, Any]) -> None:
    assert probe["trained_keys"] == [f"decoder.layers.{m}.{f}" for m in
                                     ("mlp.linear_fc1", "mlp.linear_fc2", "self_attention.linear_qkv")
                                     for f in ("lora_a", "lora_b")]
    assert probe["fc1_b_saved_as"] == "ShardedTensorFactory"  # SwiGLU halves, as megatron saves W
    assert not probe["base_part_has_adapters"]
    assert probe["merged_layers"] == 2 * 3
    assert probe["merge_error"] < 1e-5 and probe["adapters_left"] == []


# ---- the memory plan ------------------------------------------------------------------------

LLAMA_TP8 = ["model=llama2_7b", "parallel.tp=8", "cluster.procs_per_node=8", "tokenizer.vocab_size=32000",
             "parallel.precision=bf16", "train.micro_batch=1", "train.global_batch=8", "ckpt.load=/"]
H, FFN, LAYERS, S, R = 4096, 11008, 32, 4096, 16


def compose(*overrides: str) -> DictConfig:
    points, errors = preflight(list(overrides), multirun=False, device=False)  # as `chatforge plan`
    assert not errors, errors
    return points[0].cfg


def test_plan_counts_adapters_by_hand() -> None:
    # Column layers (qkv, fc1): A [r, in] whole, B [out / 8, r]; row layers (proj, fc2):
    # A [r, in / 8], B [out, r] whole. Llama 2 7B: qkv out 3h, SwiGLU fc1 out 2 x ffn.
    per_layer = R * ((H + 3 * H // 8) + (H // 8 + H) + (H + 2 * FFN // 8) + (FFN // 8 + H))
    assert per_layer == 360_960
    cfg = compose(*LLAMA_TP8, "stage=sft", "lora.rank=16")
    assert lora_params_per_device(cfg) == LAYERS * per_layer == 11_550_720
    only_qkv = compose(*LLAMA_TP8, "stage=sft", "lora.rank=16", "lora.targets=linear_qkv")
    assert lora_params_per_device(only_qkv) == LAYERS * R * (H + 3 * H // 8)


def test_lora_memory_against_full_fine_tuning() -> None:
    full = memory_per_device(compose(*LLAMA_TP8, "stage=sft"))
    lora = memory_per_device(compose(*LLAMA_TP8, "stage=sft", "lora.rank=16"))
    adapters = 11_550_720
    # bf16: weights 2 B each (base + adapters); fp32 grads 4 B and master + Adam m, v 12 B only
    # for the adapters.
    assert lora.weights == pytest.approx(full.weights + 2 * adapters)
    assert lora.grads == pytest.approx(4 * adapters)  # 46 MB instead of 3.37 GB
    assert lora.optimizer == pytest.approx(12 * adapters)
    assert full.grads / 1e9 == pytest.approx(3.37, abs=0.01) and lora.grads / 1e9 == pytest.approx(0.046, abs=1e-3)
    # u = A x (r per token, 2 B) for every adapter of every layer.
    assert lora.activations["none"] - full.activations["none"] == pytest.approx(LAYERS * 4 * 2 * S * R)
    assert lora.total / 1e9 == pytest.approx(19.7, abs=0.1) and full.total / 1e9 == pytest.approx(33.0, rel=0.1)


def test_lora_reference_shares_the_policy_base() -> None:
    """DPO's and PPO's reference is the policy's base with adapters off: no frozen copy.
    PPO's critic trains adapters and its scalar head (h + 1)."""
    rl = ("ckpt.load=/", "ppo.reward=/")
    dpo_full, dpo = (memory_per_device(compose(*LLAMA_TP8, "stage=dpo", *extra)) for extra in ((), ("lora.rank=16",)))
    ppo_full, ppo = (memory_per_device(compose(*LLAMA_TP8, "stage=ppo", *rl, *extra))
                     for extra in ((), ("lora.rank=16",)))
    assert dpo_full.frozen > 0 and dpo.frozen == 0.0
    assert ppo.frozen == pytest.approx(ppo_full.frozen / 2)  # the reward model only
    assert ppo.trainable_params == 2 * 11_550_720 + H + 1
    assert ppo.grads == pytest.approx(4 * ppo.trainable_params)


def test_full_recompute_keeps_one_input_per_block() -> None:
    """Megatron's uniform method: the input of every block of recompute_num_layers layers,
    plus one block's activations while it is rebuilt. Korthikanti et al. eq. 2 (t = 8, 16-bit),
    the MLP's share scaled for SwiGLU (ffn / 4h x 1.5)."""
    mlp = 16 * FFN / (4 * H) * 1.5
    layer = S * H * (10 + (8 + mlp) / 8 + 5 * 32 * S / (H * 8))
    selective = S * H * (10 + (8 + mlp) / 8)
    for blocks_of in (1, 4):
        mem = memory_per_device(compose(*LLAMA_TP8, "parallel.recompute=full",
                                        f"parallel.recompute_num_layers={blocks_of}"))
        assert mem.activations["full"] == pytest.approx(LAYERS // blocks_of * 2 * S * H + blocks_of * layer)
        assert mem.activations["selective"] == pytest.approx(LAYERS * selective)
        assert mem.activations["none"] == pytest.approx(LAYERS * layer)
    # 1.63 GB with one-layer blocks against 17.7 GB without recomputation.
    assert memory_per_device(compose(*LLAMA_TP8, "parallel.recompute=full")).total / 1e9 == pytest.approx(
        33.0 - 17.74 + 1.63, abs=0.1)


# ---- config checks --------------------------------------------------------------------------

def _errors(**sections: Any) -> list[str]:
    cfg = OmegaConf.merge(OmegaConf.structured(Config), sections)
    return [str(error) for error in find_errors(cfg)]


@pytest.mark.parametrize("sections, expected", [
    ({"lora": {"rank": -1}}, "lora.rank=-1: must be an integer >= 0"),
    ({"lora": {"rank": 8}}, "lora.rank=8: adapters train on a frozen base model: needs ckpt.load"),
    ({"lora": {"rank": 8, "alpha": 0}, "ckpt": {"load": "/"}}, "lora.alpha=0.0: must be > 0"),
    ({"lora": {"rank": 8, "dropout": 1.0}, "ckpt": {"load": "/"}}, "lora.dropout=1.0: must be in [0, 1)"),
    ({"lora": {"rank": 8, "targets": "linear_qkv,dense"}, "ckpt": {"load": "/"}},
     "lora.targets=linear_qkv,dense: must be distinct names among linear_qkv,linear_proj,linear_fc1,linear_fc2"),
    ({"lora": {"rank": 8, "targets": ""}, "ckpt": {"load": "/"}}, "lora.targets='': must be distinct names"),
    ({"optim": {"name": "adam8bit"}}, "optim.name=adam8bit: 8-bit Adam (bitsandbytes) is not supported"),
    ({"parallel": {"recompute_num_layers": 0}}, "parallel.recompute_num_layers=0: must be an integer >= 1"),
], ids=["rank", "no-base", "alpha", "dropout", "targets", "no-targets", "adam8bit", "recompute-layers"])
def test_bad_memory_saver_configs_name_the_key(sections: dict[str, Any], expected: str, tmp_path: Any) -> None:
    errors = _errors(run={"dir": str(tmp_path)}, **sections)
    assert any(e.startswith(expected) for e in errors), errors


def test_good_lora_config_and_stages_without_training_pass(tmp_path: Any) -> None:
    assert _errors(run={"dir": str(tmp_path)}, stage={"name": "sft"}, lora={"rank": 8}, ckpt={"load": "/"}) == []
    # best_of_n trains nothing: lora.* is ignored there (a recipe may set it for every stage).
    bon = _errors(run={"dir": str(tmp_path)}, stage={"name": "best_of_n"}, lora={"rank": 8},
                  ckpt={"load": "/"}, best_of_n={"reward": "/"})
    assert bon == []
