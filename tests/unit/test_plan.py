"""`chatforge plan`: Megatron's rank order, and memory figures against a hand calculation."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

from launcher.cli import preflight
from launcher.plan import Layout, count_params, cost_estimate, memory_per_device

CHATFORGE = Path(sys.executable).parent / "chatforge"
LLAMA_TP8 = ["model=llama2_7b", "parallel.tp=8", "cluster.procs_per_node=8",
             "tokenizer.vocab_size=32000", "parallel.precision=bf16", "train.micro_batch=1",
             "train.global_batch=8"]


def compose(*overrides: str) -> DictConfig:
    points, errors = preflight(list(overrides), multirun=False, device=False)  # as `chatforge plan`
    assert not errors, errors
    return points[0].cfg


def test_rank_groups_follow_megatron_tp_dp_pp_order() -> None:
    # Megatron's docstring example: tp 2, dp 3, pp 4 -> dp_group[0] = [0, 2, 4].
    lay = Layout(world=24, tp=2, pp=4, dp=3, procs_per_node=8)
    assert lay.tp_groups()[0] == [0, 1] and lay.tp_groups()[-1] == [22, 23]
    assert lay.dp_groups()[0] == [0, 2, 4] and lay.dp_groups()[1] == [1, 3, 5]
    assert lay.dp_groups()[-1] == [19, 21, 23]
    assert lay.pp_groups()[0] == [0, 6, 12, 18]
    assert [lay.node(r) for r in (0, 7, 8, 23)] == [0, 0, 1, 2]
    every = sorted(r for g in lay.tp_groups() for r in g)
    assert every == list(range(24))


def test_llama2_7b_tp8_memory_matches_a_hand_calculation() -> None:
    cfg = compose(*LLAMA_TP8)
    # Parameters: per layer 4h^2 (attention, no bias) + 3*h*ffn (SwiGLU) + 2h (RMSNorm);
    # embedding and untied output V*h each; final norm h.
    h, ffn, layers, vocab = 4096, 11008, 32, 32000
    per_layer = 4 * h * h + 3 * h * ffn + 2 * h
    total = layers * per_layer + 2 * vocab * h + h
    assert count_params(cfg)[1] == total  # 6.74e9, Llama 2's published 6.7B
    per_device = total / 8  # TP8, PP1: everything split 8 ways (norms are noise)
    # bf16 as Megatron: 2 B weights, 4 B fp32 main grads, 12 B fp32 master + Adam m, v.
    hand_weights, hand_grads, hand_optim = 2 * per_device, 4 * per_device, 12 * per_device
    # Korthikanti et al. eq. 2 (TP, no sequence parallel), 16-bit: s*b*h*(10 + 24/t + 5as/(ht)).
    s, b, a, t = 4096, 1, 32, 8
    hand_act = layers * s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    hand_selective = layers * s * b * h * (10 + 24 / t)
    mem = memory_per_device(cfg)
    for got, hand in ((mem.weights, hand_weights), (mem.grads, hand_grads),
                      (mem.optimizer, hand_optim), (mem.activations["none"], hand_act),
                      (mem.activations["selective"], hand_selective)):
        assert got == pytest.approx(hand, rel=0.10)
    # The hand figures: 1.68 GB weights, 3.37 GB grads, 10.1 GB optimizer, 17.7 GB activations.
    assert hand_act / 1e9 == pytest.approx(17.7, abs=0.1)
    assert mem.total / 1e9 == pytest.approx(33.0, rel=0.10)


def test_distributed_optimizer_shards_optimizer_states_over_dp() -> None:
    base = LLAMA_TP8[:2] + ["cluster.procs_per_node=32"] + LLAMA_TP8[3:-1] + [
        "train.global_batch=16"]
    plain = memory_per_device(compose(*base))
    sharded = memory_per_device(compose(*base, "parallel.distributed_optimizer=true"))
    assert sharded.optimizer == pytest.approx(plain.optimizer / 4)  # dp = 32 / 8
    assert sharded.weights == plain.weights


def test_step_time_and_cost_at_the_stated_mfu() -> None:
    cfg = compose(*LLAMA_TP8, "cluster.mfu=0.5", "cluster.price_per_gpu_hour=3",
                  "train.steps=1000")
    c = cost_estimate(cfg)
    total = count_params(cfg)[1]
    flops = (6 * total + 12 * 32 * 4096 * 4096) * 8 * 4096
    assert c.step_s == pytest.approx(flops / (8 * 989e12 * 0.5))
    assert c.device_hours == pytest.approx(c.step_s * 1000 * 8 / 3600)
    assert c.price == pytest.approx(c.device_hours * 3)


def test_plan_prints_layout_memory_cost_and_the_sbatch_script(tmp_path: Path) -> None:
    # The launcher checks that sbatch is on PATH; plan never runs it, so a stand-in will do
    # (the SLURM tests use the real one).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    proc = subprocess.run([str(CHATFORGE), "plan", *LLAMA_TP8[:-1], "cluster=slurm",
                           "cluster.gpus_per_node=8", "cluster.nodes=2", "parallel.pp=2",
                           "train.global_batch=16", "cluster.node_local_prefixes=[]",
                           f"run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for needle in ("## resolved config", "TP groups", "[0, 1, 2, 3, 4, 5, 6, 7]  (node 0)",
                   "PP groups", "[0, 8]  (nodes 0,1)", "activations, recompute=selective",
                   "device-hours", "#SBATCH --gpus-per-node=8", "#SBATCH --nodes=2"):
        assert needle in out, needle
    assert not (tmp_path / "run").exists()


def test_post_training_stages_in_the_memory_plan() -> None:
    """DPO holds a frozen reference (its weights again) and runs chosen + rejected rows (twice
    the activations and logits of SFT); best-of-N holds two frozen models and trains nothing."""
    sft = memory_per_device(compose(*LLAMA_TP8, "stage=sft"))
    dpo = memory_per_device(compose(*LLAMA_TP8, "stage=dpo"))
    bon = memory_per_device(compose(*LLAMA_TP8, "stage=best_of_n", "ckpt.load=/", "best_of_n.reward=/"))
    assert sft.frozen == 0.0
    assert dpo.frozen == pytest.approx(sft.weights)  # 1.68 GB: the reference in bf16 on TP8
    assert dpo.activations["none"] == pytest.approx(2 * sft.activations["none"])
    assert dpo.logits == pytest.approx(2 * sft.logits)
    assert dpo.total - sft.total == pytest.approx(sft.weights + sft.activations["none"] + sft.logits)
    assert bon.grads == bon.optimizer == bon.activations["none"] == 0.0
    assert bon.frozen == pytest.approx(2 * sft.weights)


def test_rl_stages_train_a_critic_in_the_memory_plan() -> None:
    """PPO and A2C train a critic beside the policy (its weights, grads and optimizer states
    again) and hold the reference and the reward model frozen; one row per prompt. With
    selective recomputation that outweighs DPO's doubled rows."""
    rl = ("ckpt.load=/", "ppo.reward=/")
    sft = memory_per_device(compose(*LLAMA_TP8, "stage=sft", "parallel.recompute=selective"))
    dpo = memory_per_device(compose(*LLAMA_TP8, "stage=dpo", "parallel.recompute=selective"))
    ppo = memory_per_device(compose(*LLAMA_TP8, "stage=ppo", *rl, "parallel.recompute=selective"))
    a2c = memory_per_device(compose(*LLAMA_TP8, "stage=a2c", *rl, "parallel.recompute=selective"))
    assert (ppo.trained_models, sft.trained_models) == (2, 1)
    for part in ("weights", "grads", "optimizer"):
        assert getattr(ppo, part) == pytest.approx(2 * getattr(sft, part)), part
    assert ppo.frozen == pytest.approx(2 * sft.weights)
    assert ppo.activations == pytest.approx(sft.activations) and ppo.logits == pytest.approx(sft.logits)
    trained_model = sft.weights + sft.grads + sft.optimizer
    assert ppo.total - sft.total == pytest.approx(trained_model + 2 * sft.weights)
    assert ppo.total > dpo.total
    assert a2c.total == pytest.approx(ppo.total)  # pp=1: one microbatch in flight either way


def test_critic_free_methods_in_the_memory_plan() -> None:
    """GRPO builds no critic; with the verifier as its reward no reward model; with
    ppo.kl_coef=0 no reference: the plan counts what the config builds."""
    rl = ("ckpt.load=/", "parallel.recompute=selective")
    sft = memory_per_device(compose(*LLAMA_TP8, "stage=sft", "parallel.recompute=selective"))
    ppo = memory_per_device(compose(*LLAMA_TP8, "stage=ppo", "ppo.reward=/", *rl))
    grpo_rm = memory_per_device(compose(*LLAMA_TP8, "stage=grpo", "ppo.reward=/", *rl))
    grpo_gold = memory_per_device(compose(*LLAMA_TP8, "stage=grpo", "ppo.reward_funcs=[gold]", *rl))
    dr_grpo = memory_per_device(compose(*LLAMA_TP8, "stage=dr_grpo", "ppo.reward_funcs=[gold]", *rl))
    assert (grpo_rm.trained_models, grpo_rm.frozen) == (1, pytest.approx(2 * sft.weights))
    assert grpo_gold.frozen == pytest.approx(sft.weights)  # the reference only
    assert dr_grpo.frozen == 0.0  # kl_coef 0: no reference either
    trained_model = sft.weights + sft.grads + sft.optimizer
    assert ppo.total - grpo_rm.total == pytest.approx(trained_model)  # the critic
