"""tools/bench/gpu.py, the one-command GPU benchmark, run with --tiny on the CPU so that it
cannot rot between the days a GPU is at hand (the figures themselves are not checked)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tools.bench.gpu import peak_of


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce GTX 1080", None)])
def test_peak_table(name: str, tflops: float | None) -> None:
    assert peak_of(name) == tflops


def test_tiny_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "tools.bench.gpu", "--tiny", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tiny"] and report["device"] == "cpu" and report["peak_tflops"] is None
    pre = report["pretrain"]
    assert [r["recompute"] for r in pre["runs"]] == ["none", "selective"]
    assert pre["layer_spec"] == "local" and pre["precision"] == "fp32"
    shape = pre["shape"]
    for run in pre["runs"]:
        assert run["tokens_per_s"] > 0 and run["mfu"] is None  # no peak on a CPU
        # PaLM's model FLOPs per token: 6N + 12 L H T (H = heads x head dim).
        attention = 12 * shape["num_layers"] * shape["hidden_size"] * shape["seq_length"]
        assert run["flops_per_token"] == 6 * run["parameters"] + attention
        assert abs(run["model_tflops"] - run["tokens_per_s"] * run["flops_per_token"] / 1e12) < 1e-12
    gen = report["generation"]
    assert gen["batch"] == 64 and gen["tokens_per_s"] > 0
    grpo, ppo = report["grpo"], report["ppo"]
    assert grpo["advantage_estimator"] == "grpo" and not grpo["critic"]
    assert ppo["advantage_estimator"] == "gae" and ppo["critic"]
    for rl in (grpo, ppo):
        assert set(rl["shares"]) == {"generation", "scoring", "forwards", "training"}
        assert abs(sum(rl["shares"].values()) - 1.0) < 1e-9
        assert all(v >= 0 for v in rl["phase_s"].values()) and rl["phase_s"]["training"] > 0
        assert rl["iteration_s"] >= 0.9 * sum(rl["phase_s"].values())
        assert rl["optimizer_steps"] >= 1 and 0 < rl["response_length"] <= rl["max_new_tokens"]
    assert "skipped" in report["allreduce"]  # no GPU here
    assert len(report["rows"]) == 6 and all(row.startswith("| cpu |") for row in report["rows"])


def test_ddp_allreduce_two_gloo_ranks(tmp_path: Path) -> None:
    """tools/bench/ddp_allreduce.py (gpu.py's all-reduce section on a multi-GPU node) on 2 gloo
    ranks: both settings measured on the same gradient bytes, and parallel.ddp_bucket_size
    really splits megatron's grad buffer into buckets when overlap is on."""
    out = tmp_path / "ddp.json"
    proc = subprocess.run([sys.executable, "-m", "tools.bench.ddp_allreduce", "--tiny", "--rounds", "2",
                           "--warmup", "1", "--settings", "off,on:20000", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["procs"] == 2 and report["backend"] == "gloo"
    off, small = report["settings"]
    assert (off["setting"], off["buckets"]) == ("off", 1)  # megatron: one bucket without overlap
    assert small["setting"] == "on:20000" and small["buckets"] > 1
    assert off["grad_elements"] == small["grad_elements"] > 0
    assert len(off["rounds"]) == 2 * 5 and len(small["rounds"]) == 2  # off: --inner 5 pairs per backward
    for s in (off, small):
        assert all(r["raw_s"] > 0 and r["ddp_s"] >= 0 for r in s["rounds"])
        assert s["forward_backward_sync_s"] >= s["ddp_s"]
    assert report["median_ratio"] == off["median_ratio"] > 0
