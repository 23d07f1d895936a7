"""Supervised fine-tuning: next-token loss on the assistant turns of chat conversations."""
from __future__ import annotations

from typing import Any, Optional

import torch

from parallel.engine import Engine
from trainer.batches import packed_inputs
from trainer.data.chat import Message
from trainer.data.chat_prepare import prepare_chat_data
from trainer.data.gpt_dataset import ArrayDataset, SampleLoader
from trainer.data.tokenizer import Tokenizer
from trainer.losses import masked_token_loss
from trainer.runtime import RunContext
from trainer.stages.base import SupervisedStage


def sft_forward(batch: dict[str, torch.Tensor], model: torch.nn.Module, device: torch.device) -> Any:
    """Megatron forward_step: per-token loss, kept only where the loss mask marks an
    assistant token (content and <|im_end|>) of the same conversation."""
    x = packed_inputs(batch, device)
    per_token = model(x["input_ids"], x["position_ids"], x["attention_mask"], labels=x["labels"])
    mask = batch["loss_mask"].to(device)
    return per_token, lambda output: masked_token_loss(output, mask)


class SFTStage(SupervisedStage):
    """From ckpt.load (a pretrained or open model) or from scratch."""

    name = "sft"

    def __init__(self, ctx: RunContext, conversations: Optional[list[list[Message]]] = None) -> None:
        super().__init__(ctx)
        cfg, topo = ctx.cfg, ctx.topo
        if str(cfg.model.head) != "lm":
            raise ValueError(f"model.head={cfg.model.head}: stage={self.name} trains a language model (lm)")
        tok_path, train, evals = prepare_chat_data(ctx, "sft", items=conversations)
        self.train_set = ArrayDataset(train, seed=int(cfg.seed), what="SFT sequences")
        self.eval_set = ArrayDataset(evals, seed=int(cfg.seed) + 1, what="held-out SFT sequences")
        self.loader = SampleLoader(self.train_set, cfg.train.global_batch, cfg.train.micro_batch,
                                   topo.dp_rank, topo.dp)
        self.engine = Engine(cfg.model, cfg.parallel, topo, vocab_size=Tokenizer(tok_path).vocab_size,
                             seed=int(cfg.seed), optim=cfg.optim, total_steps=int(cfg.train.steps),
                             lora=cfg.lora)

    @property
    def tokens_per_step(self) -> int:
        return int(self.cfg.train.global_batch) * int(self.cfg.model.seq_length)

    def step_fn(self, batch: dict[str, torch.Tensor], model: torch.nn.Module) -> Any:
        return sft_forward(batch, model, self.ctx.device)
