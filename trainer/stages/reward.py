"""Reward model: the GPT with a scalar head, trained on preference pairs."""
from __future__ import annotations

from typing import Any

import torch

from parallel.engine import Engine
from trainer.batches import causal_mask, pair_collate
from trainer.data.chat_prepare import prepare_chat_data
from trainer.data.gpt_dataset import ArrayDataset, SampleLoader
from trainer.data.tokenizer import Tokenizer
from trainer.losses import pairwise_reward_loss, read_reward
from trainer.runtime import RunContext
from trainer.stages.base import SupervisedStage


def reward_values(batch: dict[str, torch.Tensor], model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """Scalar-head values [n, S, 1] of sequences batch["tokens"] [n, S+1] (inputs: all but the
    last position, which is padding or beyond the response: see chat_prepare.pair_arrays)."""
    tokens = batch["tokens"].to(device, non_blocking=True)
    inputs = tokens[:, :-1].contiguous()
    n, s = inputs.shape
    positions = torch.arange(s, device=device).unsqueeze(0).expand(n, s)
    return model(inputs, positions, causal_mask(s, device))


def rewards_of(values: torch.Tensor, batch: dict[str, torch.Tensor], reduce: str) -> torch.Tensor:
    """[n] rewards from values [n, S, 1] and the token-aligned response mask [n, S+1]."""
    mask = batch["response_mask"][:, :-1].to(values.device)
    return read_reward(values.squeeze(-1).float(), mask, reduce)


def rm_forward(batch: dict[str, torch.Tensor], model: torch.nn.Module, device: torch.device,
               reduce: str = "last", margin: float = 0.0) -> Any:
    """Megatron forward_step for pairs (rows 2i chosen, 2i+1 rejected): pairwise loss."""
    values = reward_values(batch, model, device)

    def loss_fn(output: torch.Tensor) -> Any:
        rewards = rewards_of(output, batch, reduce)
        return pairwise_reward_loss(rewards[0::2], rewards[1::2], margin)

    return values, loss_fn


class RewardModelStage(SupervisedStage):
    """From an SFT or pretrained checkpoint (ckpt.load: the LM head is replaced by a
    zero-initialised scalar head) or from scratch."""

    name = "rm"

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        cfg, topo = ctx.cfg, ctx.topo
        if str(cfg.model.head) != "scalar":
            raise ValueError(f"model.head={cfg.model.head}: stage=rm needs model.head=scalar "
                             "(conf/stage/rm.yaml sets it)")
        tok_path, train, evals = prepare_chat_data(ctx, "pairs")
        self.train_set = ArrayDataset(train, seed=int(cfg.seed), what="preference pairs")
        self.eval_set = ArrayDataset(evals, seed=int(cfg.seed) + 1, what="held-out preference pairs")
        self.loader = SampleLoader(self.train_set, cfg.train.global_batch, cfg.train.micro_batch,
                                   topo.dp_rank, topo.dp, collate=pair_collate)
        self.engine = Engine(cfg.model, cfg.parallel, topo, vocab_size=Tokenizer(tok_path).vocab_size,
                             seed=int(cfg.seed), optim=cfg.optim, total_steps=int(cfg.train.steps))

    @property
    def tokens_per_step(self) -> int:
        return 2 * int(self.cfg.train.global_batch) * int(self.cfg.model.seq_length)

    def step_fn(self, batch: dict[str, torch.Tensor], model: torch.nn.Module) -> Any:
        return rm_forward(batch, model, self.ctx.device, str(self.cfg.rm.reduce), float(self.cfg.rm.margin))
