"""Pretraining: next-token loss on packed token windows."""
from __future__ import annotations

from typing import Any

import torch

from parallel.engine import Engine
from trainer.batches import lm_inputs
from trainer.data.gpt_dataset import SampleLoader, SequenceDataset
from trainer.data.indexed import IndexedTokens
from trainer.data.prepare import PreparedData, load_prepared, prepare_pretrain_data
from trainer.losses import masked_token_loss
from trainer.runtime import RunContext
from trainer.stages.base import SupervisedStage


def prepared_text(ctx: RunContext) -> PreparedData:
    """Rank 0 generates/tokenizes the corpus (idempotent on rerun); the others wait."""
    if ctx.is_main:
        prepared = prepare_pretrain_data(ctx.cfg, ctx.run_dir)
    ctx.barrier()
    if not ctx.is_main:
        prepared = load_prepared(ctx.cfg, ctx.run_dir)
    return prepared


def lm_forward(batch: dict[str, torch.Tensor], model: torch.nn.Module, device: torch.device) -> Any:
    """Megatron forward_step for next-token loss; also used by SFT (with a loss mask)."""
    inputs = lm_inputs(batch["tokens"], device)
    per_token = model(inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"],
                      labels=inputs["labels"])
    mask = batch.get("loss_mask")
    mask = None if mask is None else mask.to(device)
    return per_token, lambda output: masked_token_loss(output, mask)


class PretrainStage(SupervisedStage):
    name = "pretrain"

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        cfg, topo = ctx.cfg, ctx.topo
        self.data = prepared_text(ctx)
        ctx.tokenizer_path = self.data.tokenizer_path
        tokens = IndexedTokens(self.data.prefix)
        seq = int(cfg.model.seq_length)
        self.train_set = SequenceDataset(tokens, self.data.train_docs, seq, seed=int(cfg.seed))
        self.eval_set = SequenceDataset(tokens, self.data.eval_docs, seq, seed=int(cfg.seed) + 1)
        self.loader = SampleLoader(self.train_set, cfg.train.global_batch, cfg.train.micro_batch,
                                   topo.dp_rank, topo.dp)
        self.engine = Engine(cfg.model, cfg.parallel, topo, vocab_size=self.data.vocab_size,
                             seed=int(cfg.seed), optim=cfg.optim, total_steps=int(cfg.train.steps),
                             lora=cfg.lora)

    @property
    def tokens_per_step(self) -> int:
        return int(self.cfg.train.global_batch) * int(self.cfg.model.seq_length)

    def step_fn(self, batch: dict[str, torch.Tensor], model: torch.nn.Module) -> Any:
        return lm_forward(batch, model, self.ctx.device)
