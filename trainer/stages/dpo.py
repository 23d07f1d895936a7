"""Direct preference optimisation: a trainable policy and a frozen reference (forward only)."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from parallel.engine import Engine
from parallel.lora import WithoutAdapters
from trainer.batches import pair_collate, response_nll
from trainer.checkpointing import load_weights
from trainer.data.chat_prepare import prepare_chat_data
from trainer.data.gpt_dataset import ArrayDataset, SampleLoader
from trainer.data.tokenizer import Tokenizer
from trainer.losses import dpo_loss, outputs_only, sequence_logprobs
from trainer.runtime import RunContext
from trainer.stages.base import SupervisedStage

Batch = dict[str, torch.Tensor]


def reference_step(batch: Batch, model: torch.nn.Module, device: torch.device) -> Any:
    """forward_outputs step: sequence log-probs of every row under the frozen reference."""
    per_token, mask = response_nll(batch, model, device)
    return per_token, lambda output: outputs_only(output, logps=sequence_logprobs(output, mask))


def dpo_forward(batch: Batch, model: torch.nn.Module, device: torch.device, beta: float,
                kind: str = "sigmoid", label_smoothing: float = 0.0) -> Any:
    """Megatron forward_step for pairs with batch["ref_logps"] [2n] attached: DPO loss."""
    per_token, mask = response_nll(batch, model, device)
    ref = batch["ref_logps"].to(per_token.device)

    def loss_fn(output: torch.Tensor) -> Any:
        logps = sequence_logprobs(output, mask)
        return dpo_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], beta=beta, kind=kind,
                        label_smoothing=label_smoothing)

    return per_token, loss_fn


class DPOStage(SupervisedStage):
    """Policy and reference both start from ckpt.load (an SFT checkpoint); the reference
    stays frozen. Its log-probs are computed once for every pair before training
    (dpo.precompute_ref=true) or by one reference forward per step."""

    name = "dpo"

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        cfg, topo = ctx.cfg, ctx.topo
        if str(cfg.model.head) != "lm":
            raise ValueError(f"model.head={cfg.model.head}: stage=dpo trains a language model (lm)")
        tok_path, train, evals = prepare_chat_data(ctx, "pairs")
        self.train_set = ArrayDataset(train, seed=int(cfg.seed), what="preference pairs")
        self.eval_set = ArrayDataset(evals, seed=int(cfg.seed) + 1, what="held-out preference pairs")
        self.loader = SampleLoader(self.train_set, cfg.train.global_batch, cfg.train.micro_batch,
                                   topo.dp_rank, topo.dp, collate=pair_collate)
        vocab = Tokenizer(tok_path).vocab_size
        self.engine = Engine(cfg.model, cfg.parallel, topo, vocab_size=vocab, seed=int(cfg.seed),
                             optim=cfg.optim, total_steps=int(cfg.train.steps), lora=cfg.lora)
        # With LoRA the policy's frozen base is the reference: no second copy of the model.
        self.reference: Any = WithoutAdapters(self.engine)
        if self.engine.lora is None:
            # Same seed: without ckpt.load the reference is the policy's initial weights.
            self.reference = Engine(cfg.model, cfg.parallel, topo, vocab_size=vocab, seed=int(cfg.seed))
            if cfg.ckpt.load:
                load_weights(str(cfg.ckpt.load), {"reference": self.reference}, cfg.model,
                             sources={"reference": "model"})
        self._cache: dict[str, Optional[np.ndarray]] = {"train": None, "eval": None}

    @property
    def tokens_per_step(self) -> int:
        return 2 * int(self.cfg.train.global_batch) * int(self.cfg.model.seq_length)

    # -- reference log-probs --------------------------------------------------------------
    def _reference_logps(self, microbatches: list[Batch]) -> list[torch.Tensor]:
        outputs = self.reference.forward_outputs(
            microbatches, lambda b, m: reference_step(b, m, self.ctx.device))
        return [out["logps"] for out in outputs]

    def _precompute(self, dataset: ArrayDataset) -> np.ndarray:
        """[rows, 2] reference log-probs (chosen, rejected) of every pair: each DP rank
        scores every dp-th row, then the ranks share them."""
        topo, mb = self.ctx.topo, int(self.cfg.train.micro_batch)
        rows = np.arange(topo.dp_rank, len(dataset), topo.dp)
        mine: dict[int, tuple[float, float]] = {}
        for k in range(0, len(rows), mb):
            chunk = [int(r) for r in rows[k:k + mb]]
            samples = [dataset.item(r) for r in chunk]
            logps = self._reference_logps([pair_collate(samples)])[0].view(-1, 2)
            mine.update({r: (float(v[0]), float(v[1])) for r, v in zip(chunk, logps)})
        parts: list[Any] = [mine]
        if topo.dp > 1:
            parts = [None] * topo.dp
            dist.all_gather_object(parts, mine, group=topo.dp_group)
        table = np.zeros((len(dataset), 2), dtype=np.float64)
        for part in parts:
            for row, values in part.items():
                table[row] = values
        return table

    def _with_reference(self, microbatches: list[Batch], split: str, dataset: ArrayDataset) -> list[Batch]:
        if not bool(self.cfg.dpo.precompute_ref):
            for batch, logps in zip(microbatches, self._reference_logps(microbatches)):
                batch["ref_logps"] = logps
            return microbatches
        if self._cache[split] is None:
            self._cache[split] = self._precompute(dataset)
        table = self._cache[split]
        for batch in microbatches:
            # Rows 2i, 2i+1 of the microbatch are pair i's chosen and rejected responses.
            batch["ref_logps"] = torch.from_numpy(table[batch["index"].numpy()].reshape(-1))
        return microbatches

    # -- the stage ------------------------------------------------------------------------
    def next_microbatches(self) -> list[Batch]:
        return self._with_reference(self.loader.next_batch(), "train", self.train_set)

    def eval_batches(self) -> list[list[Batch]]:
        if self._eval_cache is None:
            batches = super().eval_batches()
            self._eval_cache = [self._with_reference(mbs, "eval", self.eval_set) for mbs in batches]
        return self._eval_cache

    def step_fn(self, batch: Batch, model: torch.nn.Module) -> Any:
        dpo = self.cfg.dpo
        return dpo_forward(batch, model, self.ctx.device, float(dpo.beta), str(dpo.loss),
                           float(dpo.label_smoothing))
