"""Reward model: the GPT with a scalar head, trained on preference pairs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from chatforge_config.parallel import ModelConfig
from parallel.engine import Engine
from trainer.batches import causal_mask, join_outputs, pair_collate, split_rows
from trainer.checkpoint_files import CheckpointError, resolve_load_path
from trainer.checkpointing import load_weights, source_model
from trainer.data.chat_prepare import longest_row, prepare_chat_data, response_rows
from trainer.data.gpt_dataset import ArrayDataset, SampleLoader
from trainer.data.tokenizer import Tokenizer, tokenizer_of
from trainer.losses import outputs_only, pairwise_reward_loss, read_reward
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
                             seed=int(cfg.seed), optim=cfg.optim, total_steps=int(cfg.train.steps),
                             lora=cfg.lora)

    @property
    def tokens_per_step(self) -> int:
        return 2 * int(self.cfg.train.global_batch) * int(self.cfg.model.seq_length)

    def step_fn(self, batch: dict[str, torch.Tensor], model: torch.nn.Module) -> Any:
        return rm_forward(batch, model, self.ctx.device, str(self.cfg.rm.reduce), float(self.cfg.rm.margin))


# ---- a finished reward model, used by other stages ----------------------------------------

def frozen_from(ctx: RunContext, path: str, model: Any, vocab_size: int) -> Engine:
    """A forward-only engine with the weights of the checkpoint at `path`."""
    engine = Engine(model, ctx.cfg.parallel, ctx.topo, vocab_size=vocab_size, seed=int(ctx.cfg.seed))
    load_weights(path, {"model": engine}, model)
    return engine


def reward_model_of(path: str, key: str, tok: Tokenizer) -> tuple[Path, DictConfig]:
    """(step dir, model config) of the reward model checkpoint that config key `key` names;
    CheckpointError if it is not a scalar-head model or was trained with another tokenizer."""
    directory = resolve_load_path(Path(path))
    model = OmegaConf.merge(OmegaConf.structured(ModelConfig), source_model(directory))
    if model.head != "scalar":
        raise CheckpointError(f"{key}={path}: model.head={model.head}, not a reward model")
    if tokenizer_of(directory).read_bytes() != Path(tok.path).read_bytes():
        raise CheckpointError(f"{key}={path}: trained with another tokenizer than this run's "
                              f"({tok.path}); its scores would read other token ids")
    return directory, model


class Scorer:
    """The reward model of a finished RM run, at this run's layout, with its own model
    config (it may differ in size from the policy). Rows are scored `micro_batch` at a time."""

    def __init__(self, ctx: RunContext, path: str, tok: Tokenizer, key: str = "best_of_n.reward",
                 micro_batch: int = 0) -> None:
        directory, self.model = reward_model_of(path, key, tok)
        self.ctx, self.tok, self.micro_batch = ctx, tok, micro_batch
        self.reduce = str(OmegaConf.load(directory / "config.yaml").rm.reduce)
        self.engine = frozen_from(ctx, str(directory), self.model, tok.vocab_size)

    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
        # Rows only as long as the longest (no compute on padding nobody needs), at most the
        # reward model's context (longer ones are truncated: chat.truncate).
        seq = longest_row(prompts, responses, int(self.model.seq_length))
        batch = response_rows(prompts, responses, seq, self.tok.pad_id)

        def step(b: dict[str, torch.Tensor], model: torch.nn.Module) -> Any:
            values = reward_values(b, model, self.ctx.device)
            return values, lambda output: outputs_only(output, reward=rewards_of(output, b, self.reduce))

        chunks = split_rows(batch, self.micro_batch or len(prompts))
        outputs = self.engine.forward_outputs(chunks, step, seq_length=seq)
        return [float(v) for v in join_outputs(outputs, len(prompts))["reward"]]
