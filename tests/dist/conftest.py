"""Fixtures shared by the multi-process tests: the small SFT policy that every RL test starts
from (trained once per session: PPO, A2C and the group methods all read it)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_trainer

# The RL tests' policy shape: small enough for CPU, big enough to learn the embedded chats.
RL_MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 96}


@pytest.fixture(scope="session")
def rl_sft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SFT run on the embedded chats (a quarter of its replies use the brief style)."""
    run = tmp_path_factory.mktemp("rl_sft")
    run_trainer(run, {"logger": "none", "seed": 5, "stage": {"name": "sft"}, "model": RL_MODEL,
                      "tokenizer": {"vocab_size": 384},
                      "train": {"steps": 150, "global_batch": 16, "micro_batch": 8, "eval_every": 0},
                      "optim": {"lr": 3e-3, "warmup_steps": 5}, "data": {"embedded": {"num_chats": 2000}}})
    return run
