"""Reward model: the GPT with a scalar head, or its LM head read as beta x log pi(y|x) (rm.score=logprob), trained on preference pairs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from chatforge_config.parallel import ModelConfig
from parallel.engine import Engine
from trainer.batches import causal_mask, join_outputs, pair_collate, response_nll, split_rows
from trainer.checkpoint_files import CheckpointError, resolve_load_path
from trainer.checkpointing import load_weights, source_model
from trainer.data.chat_prepare import longest_row, prepare_chat_data, response_rows
from trainer.data.gpt_dataset import ArrayDataset, SampleLoader
from trainer.data.tokenizer import Tokenizer, tokenizer_of
from trainer.losses import outputs_only, pairwise_reward_loss, read_reward, sequence_logprobs
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


@dataclass(frozen=True)
class RewardHead:
    """How a reward model turns a row into its reward (the rm.* keys of the run that trained
    it): a scalar head's values read by `reduce` (score="value"), or beta times the LM's
    log-prob of the response, summed or averaged over its tokens (score="logprob")."""

    score: str = "value"
    reduce: str = "last"
    beta: float = 0.1

    @classmethod
    def of(cls, rm: Any) -> "RewardHead":
        return cls(str(OmegaConf.select(rm, "score", default="value")), str(rm.reduce),
                   float(OmegaConf.select(rm, "beta", default=0.1)))

    @property
    def lm_head(self) -> bool:
        return self.score == "logprob"

    def step(self, batch: dict[str, torch.Tensor], model: torch.nn.Module,
             device: torch.device) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """(the model's output over rows of prompt + response, output -> rewards [n])."""
        if self.lm_head:
            per_token, mask = response_nll(batch, model, device)
            # mean: per response token (SimPO), so a long answer is not a worse one by default.
            scale = 1.0 / mask.sum(-1).clamp(min=1) if self.reduce == "mean" else 1.0
            return per_token, lambda out: self.beta * scale * sequence_logprobs(out, mask)
        values = reward_values(batch, model, device)
        return values, lambda out: rewards_of(out, batch, self.reduce)


def rm_forward(batch: dict[str, torch.Tensor], model: torch.nn.Module, device: torch.device,
               head: RewardHead = RewardHead(), margin: float = 0.0) -> Any:
    """Megatron forward_step for pairs (rows 2i chosen, 2i+1 rejected): pairwise loss."""
    output, to_rewards = head.step(batch, model, device)

    def loss_fn(out: torch.Tensor) -> Any:
        rewards = to_rewards(out)
        return pairwise_reward_loss(rewards[0::2], rewards[1::2], margin)

    return output, loss_fn


class RewardModelStage(SupervisedStage):
    """From an SFT or pretrained checkpoint (ckpt.load: the LM head is replaced by a
    zero-initialised scalar head, or kept with rm.score=logprob) or from scratch."""

    name = "rm"

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        cfg, topo = ctx.cfg, ctx.topo
        self.head = RewardHead.of(cfg.rm)
        needs = "lm" if self.head.lm_head else "scalar"
        if str(cfg.model.head) != needs:
            raise ValueError(f"model.head={cfg.model.head}: stage=rm with rm.score={self.head.score} needs "
                             f"model.head={needs}")
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
        return rm_forward(batch, model, self.ctx.device, self.head, float(self.cfg.rm.margin))


# ---- a finished reward model, used by other stages ----------------------------------------

def frozen_from(ctx: RunContext, path: str, model: Any, vocab_size: int) -> Engine:
    """A forward-only engine with the weights of the checkpoint at `path`."""
    engine = Engine(model, ctx.cfg.parallel, ctx.topo, vocab_size=vocab_size, seed=int(ctx.cfg.seed))
    load_weights(path, {"model": engine}, model)
    return engine


def reward_model_of(path: str, key: str, tok: Tokenizer) -> tuple[Path, DictConfig, RewardHead]:
    """(step dir, model config, how it scores) of the reward model checkpoint that config key
    `key` names; CheckpointError if it is no reward model (a scalar head, or an LM trained
    by stage=rm with rm.score=logprob) or was trained with another tokenizer."""
    directory = resolve_load_path(Path(path))
    model = OmegaConf.merge(OmegaConf.structured(ModelConfig), source_model(directory))
    run = OmegaConf.load(directory / "config.yaml") if (directory / "config.yaml").is_file() else OmegaConf.create()
    rm = OmegaConf.select(run, "rm", default=None)
    head = RewardHead.of(rm) if rm is not None else RewardHead()
    is_rm = model.head == "scalar" or (head.lm_head and OmegaConf.select(run, "stage.name", default="") == "rm")
    if not is_rm:
        raise CheckpointError(f"{key}={path}: model.head={model.head}, not a reward model (a scalar head, or "
                              "an LM trained by stage=rm with rm.score=logprob)")
    if tokenizer_of(directory).read_bytes() != Path(tok.path).read_bytes():
        raise CheckpointError(f"{key}={path}: trained with another tokenizer than this run's "
                              f"({tok.path}); its scores would read other token ids")
    return directory, model, head


class Scorer:
    """The reward model of a finished RM run, at this run's layout, with its own model
    config (it may differ in size from the policy). Rows are scored `micro_batch` at a time."""

    def __init__(self, ctx: RunContext, path: str, tok: Tokenizer, key: str = "best_of_n.reward",
                 micro_batch: int = 0) -> None:
        directory, self.model, self.head = reward_model_of(path, key, tok)
        self.ctx, self.tok, self.micro_batch = ctx, tok, micro_batch
        self.engine = frozen_from(ctx, str(directory), self.model, tok.vocab_size)

    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
        # Rows only as long as the longest (no compute on padding nobody needs), at most the
        # reward model's context (longer ones are truncated: chat.truncate).
        seq = longest_row(prompts, responses, int(self.model.seq_length))
        batch = response_rows(prompts, responses, seq, self.tok.pad_id)

        chunks = split_rows(batch, self.micro_batch or len(prompts))
        outputs = self.engine.forward_outputs(chunks, self.step, seq_length=seq)
        return [float(v) for v in join_outputs(outputs, len(prompts))["reward"]]

    def step(self, batch: dict[str, torch.Tensor], model: torch.nn.Module) -> Any:
        """forward_outputs step: {"reward": [n]} of rows of prompt + response."""
        output, to_rewards = self.head.step(batch, model, self.ctx.device)
        return output, lambda out: outputs_only(out, reward=to_rewards(out))
