"""Model builder details that the equivalence tests do not reach: the scalar head (reward
model, critic) and the bf16-on-CPU refusal. Run in a fresh process: megatron keeps global
process-group state."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.dist

SCALAR = """
import torch
from chatforge_config.parallel import ModelConfig, ParallelConfig, OptimConfig
from parallel import cpu_compat
from parallel.dist import init_distributed, local_env
from parallel.groups import init_groups
init_distributed(local_env()); cpu_compat.apply()
from parallel.engine import Engine
from trainer.batches import lm_inputs
mc = ModelConfig(head="scalar")
pc = ParallelConfig()
topo = init_groups(mc, pc, 1)
engine = Engine(mc, pc, topo, vocab_size=300, seed=1, optim=OptimConfig(lr=1e-2, warmup_steps=0))
tokens = torch.randint(0, 300, (2, 17))
x = lm_inputs(tokens, torch.device("cpu"))

def step(batch, model):
    values = model(x["input_ids"], x["position_ids"], x["attention_mask"])  # [b, s, 1]
    def loss_fn(out):
        loss = ((out.squeeze(-1) - 1.0) ** 2).sum()
        n = torch.tensor(out.numel(), dtype=torch.int)
        return loss, n, {"loss": torch.stack([loss.detach(), n.float()])}
    return values, loss_fn

with torch.no_grad():
    before = engine.model[0](x["input_ids"], x["position_ids"], x["attention_mask"])
losses = [engine.train_step([{"tokens": tokens}], step, seq_length=16).loss for _ in range(5)]
print(tuple(before.shape), float(before.abs().max()), losses[0], losses[-1])
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_scalar_head_starts_at_zero_and_trains() -> None:
    out = _run(SCALAR)
    assert out.returncode == 0, out.stderr[-3000:]
    shape, max_abs, first, last = out.stdout.split(")")[0] + ")", *out.stdout.split(")")[1].split()
    assert shape == "(2, 16, 1)"
    assert float(max_abs) == 0.0  # zero head: every reward/value starts at 0
    assert float(first) == pytest.approx(1.0)  # (0 - 1)^2
    assert float(last) < 0.8 * float(first)  # measured 0.675 after 5 steps


def test_bf16_on_cpu_names_the_key() -> None:
    code = ("from chatforge_config.parallel import ModelConfig, ParallelConfig\n"
            "from parallel.model import transformer_config\n"
            "transformer_config(ModelConfig(), ParallelConfig(precision='bf16'))\n")
    out = _run(code)
    assert out.returncode != 0
    assert "parallel.precision=bf16" in out.stderr
