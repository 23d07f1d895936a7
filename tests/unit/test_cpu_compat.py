"""The CPU compatibility layer turns on only without CUDA, and then really patches."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

PROBE = """
import torch
{pretend}
from parallel import cpu_compat
active = cpu_compat.apply()
import megatron.core.pipeline_parallel.schedules as schedules
import megatron.core.tensor_parallel.random as rng
print(active, cpu_compat.needs_cpu_compat(), schedules.torch is torch,
      rng._get_cuda_rng_state.__module__)
"""


def _probe(pretend_cuda: bool) -> list[str]:
    pretend = "torch.cuda.is_available = lambda: True" if pretend_cuda else ""
    out = subprocess.run([sys.executable, "-c", PROBE.format(pretend=pretend)], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.split()


def test_inactive_when_cuda_is_present() -> None:
    active, needed, real_torch, rng_module = _probe(pretend_cuda=True)
    assert (active, needed, real_torch) == ("False", "False", "True")
    assert rng_module == "megatron.core.tensor_parallel.random"


def test_active_on_cpu_only_machine() -> None:
    active, needed, real_torch, rng_module = _probe(pretend_cuda=False)
    assert (active, needed, real_torch) == ("True", "True", "False")
    assert rng_module == "parallel.cpu_compat"
