"""Stages: each differs only in data, step_fn, loss and the engines it holds.

STAGES maps a stage name (conf/stage/<name>.yaml) to the class that implements it; the
module is imported only when that stage runs, so this package stays torch-free."""
from __future__ import annotations

import importlib
from typing import Any

from trainer.data.formats import CONVERSATION_FORMATS, PAIR_FORMATS, PROMPT_FORMATS, TEXT_FORMATS

STAGES: dict[str, str] = {
    "tokenizer": "trainer.stages.tokenizer:TokenizerJob",
    "pretrain": "trainer.stages.pretrain:PretrainStage",
    "sft": "trainer.stages.sft:SFTStage",
    "rm": "trainer.stages.reward:RewardModelStage",
    "dpo": "trainer.stages.dpo:DPOStage",
    "best_of_n": "trainer.stages.best_of_n:BestOfNJob",
    "rejection_sampling": "trainer.stages.best_of_n:RejectionSamplingStage",
    "ppo": "trainer.stages.ppo:PPOStage",
    "a2c": "trainer.stages.ppo:A2CStage",
    # The critic-free group methods: the same RL stage, preset by conf/stage/<name>.yaml.
    "grpo": "trainer.stages.ppo:PPOStage",
    "dr_grpo": "trainer.stages.ppo:PPOStage",
    "rloo": "trainer.stages.ppo:PPOStage",
    "reinforce_pp": "trainer.stages.ppo:PPOStage",
    "eval": "trainer.stages.evaluate:EvalJob",
}

# The data formats each stage reads (data.format); the launcher checks them before a run.
STAGE_DATA: dict[str, tuple[str, ...]] = {
    "tokenizer": TEXT_FORMATS,
    "pretrain": TEXT_FORMATS,
    "sft": CONVERSATION_FORMATS,
    "rm": PAIR_FORMATS,
    "dpo": PAIR_FORMATS,
    "rejection_sampling": CONVERSATION_FORMATS,
    "ppo": PROMPT_FORMATS,
    "a2c": PROMPT_FORMATS,
    "grpo": PROMPT_FORMATS,
    "dr_grpo": PROMPT_FORMATS,
    "rloo": PROMPT_FORMATS,
    "reinforce_pp": PROMPT_FORMATS,
    "best_of_n": PROMPT_FORMATS,
    "eval": CONVERSATION_FORMATS,
}
# The model head each stage trains or runs.
STAGE_HEAD: dict[str, str] = {"rm": "scalar"}
# For the launcher's memory plan: sequences per sample (a preference pair is two), frozen
# copies of the model held next to the trained one (DPO's reference; best-of-N's policy
# and reward model, assumed the same size), more models trained beside it (the PPO/A2C
# critic, with its optimizer) and whether the stage trains at all.
ROWS_PER_SAMPLE: dict[str, int] = {"rm": 2, "dpo": 2}
# RL stages: the reference and the reward model at most (the launcher's plan counts what the
# config builds: chatforge_config.trainer.CRITIC_ESTIMATORS, ppo.kl_coef, ppo.reward_funcs).
FROZEN_MODELS: dict[str, int] = {"eval": 2, "dpo": 1, "best_of_n": 2, "rejection_sampling": 2, "ppo": 2, "a2c": 2,
                                 "grpo": 2, "dr_grpo": 2, "rloo": 2, "reinforce_pp": 2}
EXTRA_TRAINED_MODELS: dict[str, int] = {"ppo": 1, "a2c": 1}
# With LoRA (lora.rank > 0) these stages' frozen reference is the policy's own base with its
# adapters switched off: one frozen model fewer (parallel.lora.WithoutAdapters).
LORA_SHARED_REFERENCE: tuple[str, ...] = ("dpo", "ppo", "a2c", "grpo", "dr_grpo", "rloo", "reinforce_pp")
NO_TRAINING: tuple[str, ...] = ("tokenizer", "best_of_n", "eval")
# Stages that sample from a policy and score with a reward model: both checkpoints needed.
SAMPLING_STAGES: tuple[str, ...] = ("best_of_n", "rejection_sampling")
# RL stages: a policy (ckpt.load) optimised against reward sources (ppo.reward_funcs).
RL_STAGES: tuple[str, ...] = ("ppo", "a2c", "grpo", "dr_grpo", "rloo", "reinforce_pp")


def model_counts(cfg: Any) -> tuple[int, int]:
    """(frozen models, trained models besides the policy) a run of `cfg` builds: for an RL
    stage, what its ppo.* settings need (a critic for gae only; a reference unless
    ppo.kl_coef=0; the reward model when a source or the critic's start needs it)."""
    stage = str(cfg.stage.name)
    if stage not in RL_STAGES:
        return FROZEN_MODELS.get(stage, 0), EXTRA_TRAINED_MODELS.get(stage, 0)
    from chatforge_config.trainer import CRITIC_ESTIMATORS

    ppo = cfg.ppo
    critic = str(ppo.advantage_estimator) in CRITIC_ESTIMATORS
    reward_model = "rm" in [str(x) for x in ppo.reward_funcs] or (critic and str(ppo.critic_init) == "reward")
    return int(float(ppo.kl_coef) > 0) + int(reward_model), int(critic)


def build_stage(ctx: Any) -> Any:
    name = ctx.cfg.stage.name
    if name not in STAGES:
        raise ValueError(f"stage.name={name!r}: unknown stage; known: {', '.join(sorted(STAGES))}")
    module_name, cls_name = STAGES[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(ctx)
