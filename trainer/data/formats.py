"""The data formats (data.format) by what they hold; trainer.stages maps each stage to the
ones it reads, and the data preparation (chat_prepare) dispatches on them. Here, below both,
so that trainer.data does not import trainer.stages.

"auto": the shape of the first record (trainer/data/readers.detect_format), which must be
one the stage reads (the launcher checks).
"""
from __future__ import annotations

TEXT_FORMATS: tuple[str, ...] = ("embedded", "text")
# Conversations (or the chosen dialogues of preference data): SFT, rejection sampling, eval.
CONVERSATION_FORMATS: tuple[str, ...] = ("embedded", "chatml", "alpaca", "hh_rlhf", "preference", "auto")
# Preference pairs: the reward model, DPO.
PAIR_FORMATS: tuple[str, ...] = ("embedded", "hh_rlhf", "preference", "auto")
# RL prompts: any prompt source, and "prompts" files whose extra fields reach the rewards.
PROMPT_FORMATS: tuple[str, ...] = CONVERSATION_FORMATS + ("prompts",)
