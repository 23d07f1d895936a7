"""What every stage offers the one training loop."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional

import torch

from parallel.engine import Engine, StepResult
from trainer.data.gpt_dataset import SampleLoader
from trainer.runtime import RunContext


class Stage(ABC):
    """A stage holds its engines and data; the loop only asks it for steps and evals."""

    name: str = "stage"

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg

    @property
    @abstractmethod
    def tokens_per_step(self) -> int:
        """Tokens processed by one optimizer step over the whole global batch."""

    @abstractmethod
    def train_step(self, step: int) -> StepResult:
        """Run optimizer step `step` (0-based)."""

    @abstractmethod
    def engines(self) -> dict[str, Engine]:
        """The engines a checkpoint holds, by name (the names are checkpoint key prefixes)."""

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics, keys prefixed with `eval_`; empty if the stage has none."""
        return {}

    def load_sources(self) -> dict[str, str]:
        """For ckpt.load from another stage's checkpoint: engine name -> the name it was
        saved under there. Empty (the default): every engine, under its own name; otherwise
        only the engines named here are loaded, the others keep what the stage gave them."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything besides model/optimizer weights that an exact resume needs."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class SupervisedStage(Stage):
    """One trainable engine fed by a SampleLoader over `train_set`, with a step function, and
    evaluated on `eval_set`. Pretrain, SFT, reward model and DPO differ only in the data,
    `step_fn` and the engines they hold."""

    engine: Engine
    loader: SampleLoader
    eval_set: Any
    _eval_cache: Optional[list[list[dict[str, torch.Tensor]]]] = None

    @abstractmethod
    def step_fn(self, batch: dict[str, torch.Tensor], model: torch.nn.Module) -> Any:
        """Megatron forward_step_func: returns (output, loss_fn)."""

    def eval_batches(self) -> list[list[dict[str, torch.Tensor]]]:
        """The fixed held-out batches: a fresh loader from position 0, so every evaluation
        sees the same samples."""
        if self._eval_cache is None:
            train = self.loader
            loader = SampleLoader(self.eval_set, train.global_batch, train.micro_batch,
                                  train.dp_rank, train.dp_size, collate=train.collate)
            self._eval_cache = [loader.next_batch() for _ in range(int(self.cfg.train.eval_batches))]
        return self._eval_cache

    def engines(self) -> dict[str, Engine]:
        return {"model": self.engine}

    def next_microbatches(self) -> list[dict[str, torch.Tensor]]:
        return self.loader.next_batch()

    def train_step(self, step: int) -> StepResult:
        result = self.engine.train_step(self.next_microbatches(), self.step_fn)
        # Where the data stream stands after this step (Megatron's "consumed samples").
        result.extra["consumed_samples"] = self.loader.consumed_samples
        return result

    def evaluate(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        batches = self.eval_batches()
        for microbatches in batches:
            for key, value in self.engine.eval_step(microbatches, self.step_fn).items():
                totals[key] = totals.get(key, 0.0) + value / len(batches)
        return {f"eval_{key}": value for key, value in totals.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
