"""PPO and A2C through the real trainer, from a small SFT policy and a reward model trained
to prefer the brief answer style ("The answer is X."), which a quarter of the SFT replies
use (data.embedded.prefer=brief).

- PPO at TP2 gives the metrics of one process for the first iterations (within 1e-4);
- a PPO run killed (SIGKILL) during iteration 4 and rerun resumes from its last checkpoint
  (iteration 2) and logs exactly the metrics of an uninterrupted run;
- PPO and A2C raise the reward-model score of the policy's responses to held-out prompts
  while the KL to the reference stays bounded.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, read_metrics, run_trainer, write_config
from tests.dist.test_equivalence import _merge

pytestmark = pytest.mark.dist

from tests.dist.conftest import RL_MODEL as MODEL
TIMING = ("generation_s", "forward_s", "train_s", "generation_share", "tokens_per_s", "step_time_s", "elapsed")


@pytest.fixture(scope="module")
def sft(rl_sft: Path) -> Path:
    return rl_sft


@pytest.fixture(scope="module")
def reward_model(sft: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("rm")
    records = run_trainer(run, {
        "logger": "none", "seed": 5, "stage": {"name": "rm"}, "model": {**MODEL, "head": "scalar"},
        "ckpt": {"load": str(sft)},
        "train": {"steps": 60, "global_batch": 16, "micro_batch": 8, "eval_every": 60, "eval_batches": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 5},
        "data": {"eval_fraction": 0.1, "embedded": {"num_pairs": 1000, "prefer": "brief"}}})
    assert records[-1]["eval_accuracy"] >= 0.95  # the style is easy to see (measured 1.0)
    return run


def _config(stage: str, sft: Path, reward_model: Path, steps: int, **extra: Any) -> dict[str, Any]:
    base = {
        "logger": "none", "seed": 5, "stage": {"name": stage}, "model": MODEL,
        "ckpt": {"load": str(sft)}, "ppo": {"reward": str(reward_model), "rollout_batch": 16},
        "sampling": {"max_new_tokens": 24, "batch": 16},
        "train": {"steps": steps, "global_batch": 8, "micro_batch": 4, "eval_every": steps},
        "optim": {"lr": 1e-4, "warmup_steps": 0, "decay": "constant"},
        "data": {"embedded": {"num_prompts": 32, "prefer": "brief"}},
    }
    return _merge(base, extra)


# Every part of the loss on: entropy bonus, PPO-ptx and the adaptive KL controller, so the
# layout and resume checks cover their state too.
FULL = {"ppo": {"entropy_coef": 0.01, "ptx_coef": 0.1, "kl_target": 0.5, "kl_horizon": 100}}
COMPARED = ("reward", "kl", "kl_coef", "entropy", "response_length", "policy_loss", "value_loss", "clip_fraction",
            "approx_kl", "ptx_loss", "explained_variance", "grad_norm", "grad_norm_critic", "eval_reward", "eval_kl")


def _kill_after(run_dir: Path, config: dict[str, Any], step: int) -> None:
    """Start one trainer process and SIGKILL it once `step` is in metrics.jsonl."""
    path = write_config(run_dir, config)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    from launcher.local import free_port, rank_env

    proc = subprocess.Popen([sys.executable, "-m", "trainer", str(path)], cwd=REPO,
                            env={**env, **rank_env(0, 1, free_port(), 1, {})}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if metrics.exists() and any(r.get("step") == step for r in read_metrics(run_dir)):
                break
        except ValueError:
            pass  # a line being written

        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its checkpoint writer
    proc.wait(timeout=60)


def kill_rerun_matches(run_dir: Path, config: dict[str, Any], single: list[dict[str, Any]]) -> None:
    """A run killed (SIGKILL) during iteration 4 resumes from its checkpoint of iteration 2
    and logs exactly the metrics of the uninterrupted run `single` (timings aside)."""
    _kill_after(run_dir, config, 3)
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_000002", latest  # killed during iteration 4, before the final save
    resumed = run_trainer(run_dir, config)
    assert [r["step"] for r in resumed] == [r["step"] for r in single]
    for ours, ref in zip(resumed, single):
        for key in ref:
            if key not in TIMING:
                assert ours.get(key) == ref[key], (ref["step"], key)


def test_ppo_tp2_and_kill_resume_match_one_uninterrupted_process(sft: Path, reward_model: Path,
                                                                 tmp_path: Path) -> None:
    config = _merge(_config("ppo", sft, reward_model, 4, **FULL), {"ckpt": {"every": 2}})
    single = run_trainer(tmp_path / "single", config)
    assert [r["step"] for r in single] == [0, 1, 2, 3, 4]
    assert single[1]["kl"] == 0.0  # the first rollout: actor == reference
    assert single[3]["kl_coef"] != single[1]["kl_coef"]  # the adaptive controller moved beta
    assert single[-1]["ptx_loss"] > 0

    parallel = run_trainer(tmp_path / "tp2", _merge(config, {"parallel": {"tp": 2}}), world_size=2)
    for ours, ref in zip(parallel, single):
        for key in COMPARED:
            if key in ref:
                assert ours[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), (ours["step"], key)

    kill_rerun_matches(tmp_path / "killed", config, single)
    assert (tmp_path / "killed" / "samples" / "eval_000.jsonl").is_file()


def test_freeze_actor_steps_trains_the_critic_alone_first(sft: Path, reward_model: Path, tmp_path: Path) -> None:
    """ppo.freeze_actor_steps=1: iteration 1 trains only the critic (no policy loss, actor
    learning rate 0), so iteration 2 still samples from the SFT policy (KL to it exactly 0)
    while its critic has learned; from then on both train."""
    records = run_trainer(tmp_path, _config("ppo", sft, reward_model, 3, ppo={"freeze_actor_steps": 1},
                                            train={"eval_every": 0}))
    first, second, third = records[-3:]
    assert [r["step"] for r in (first, second, third)] == [1, 2, 3]
    assert "policy_loss" not in first and first["lr"] == 0.0 and first["value_loss"] > 0
    assert second["kl"] == 0.0 and "policy_loss" in second and second["lr"] > 0
    assert third["kl"] != 0.0  # the actor moved at iteration 2


@pytest.mark.parametrize("stage,steps,lr", [("ppo", 10, 1e-4), ("a2c", 15, 3e-4)])
def test_rl_raises_the_reward_with_bounded_kl(stage: str, steps: int, lr: float, sft: Path, reward_model: Path,
                                              tmp_path: Path) -> None:
    """Measured (seed 5): PPO eval reward -0.25 -> 2.03 in 10 iterations (gold share of the
    brief style 0.19 -> 0.47, KL 2.0 nats); A2C -0.25 -> ~2 in 15 (KL ~3)."""
    records = run_trainer(tmp_path, _config(stage, sft, reward_model, steps, optim={"lr": lr}))
    first, last = records[0], records[-1]
    assert first["eval_kl"] == 0.0
    assert last["eval_reward"] > first["eval_reward"] + 1.0, (first, last)
    assert max(r["reward"] for r in records[-3:]) > records[1]["reward"] + 1.0
    assert 0.0 < last["eval_kl"] < 6.0 and all(r["kl"] < 6.0 for r in records[1:])
