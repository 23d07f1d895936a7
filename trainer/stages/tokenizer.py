"""stage=tokenizer: train the sentencepiece tokenizer on the stage's text, nothing else.

The first step of a recipe, so that every later step (pretraining included) reads one
tokenizer file (tokenizer.path) and a user can swap its data or skip it for their own model.
The tokenizer is exactly the one pretraining would train on the same data settings."""
from __future__ import annotations

from trainer.data.prepare import prepare_tokenizer
from trainer.data.tokenizer import Tokenizer
from trainer.runtime import RunContext


class TokenizerJob:
    """Not a training stage: runs once (trainer/__main__ calls run())."""

    name = "tokenizer"

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def run(self) -> int:
        if self.ctx.is_main:
            path = prepare_tokenizer(self.ctx.cfg, self.ctx.run_dir)
            tok = Tokenizer(path)
            sample = "User: what is 12 plus 7?"
            print(f"[chatforge] tokenizer: {tok.vocab_size} pieces -> {path}; "
                  f"{sample!r} is {len(tok.encode(sample))} tokens", flush=True)
        self.ctx.barrier()
        return 0
