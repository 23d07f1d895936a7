"""Incremental forward of the whole GPT (every TP and PP shard) for sampling.

`IncrementalForward` turns an engine's stage module into "logits of the next token" for a
batch of sequences that grow by one token per step, with or without a KV cache:

- cache: megatron's own `StaticInferenceContext`. Each attention layer keeps its keys and
  values in a [max_length, b, groups/tp, head_dim] buffer (allocated on first use on the
  current device; on CPU through cpu_compat's proxy of megatron.core.transformer.attention),
  so step t runs only the new slots: the whole prompt once (prefill), then one slot per
  step (decode: sq=1 against sk=T cached keys). RoPE is sliced by cache slot, and the
  output layer only materialises the last slot's logits.
- no cache: the whole sequence is recomputed every step (the reference the cache is tested
  against, and the baseline of tools/bench/generation.py).

Masks are explicit whenever a row has pad slots, built from a per-slot padding flag (see
`attention_mask`): SDPA's `is_causal` aligns the triangle top-left, wrong when sq != sk, and
megatron turns the layer's mask type to no_mask after the prefill anyway. A batch without pad
slots passes no mask: the prefill is causal by the layers' mask type, and a decode step's one
query may see every cached key.

Steps run under `torch.inference_mode` (about 7% less time per cached step on CPU than
`no_grad`: no version counters or autograd metadata). What megatron memoises meanwhile (RoPE
tables) would be inference tensors that training may not save for backward; leaving the
context drops them (`_forget_inference_tensors`).

Pipeline: each step runs stage by stage. The first stage embeds, every stage but the last
sends its hidden states [s, b, h] to the next with plain send/recv on the pipeline group
(NCCL or gloo), the next stage takes them through `set_input_tensor`. The last stage
gathers the vocab-parallel logits over TP, so every TP rank holds the same full logits;
`share` then sends what the sampler chose from the last stage to every rank of the
model-parallel group, which keeps all stages in lock-step. Data-parallel replicas run
independently.
"""
from __future__ import annotations

import warnings
from types import TracebackType
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.transformer.utils import set_model_to_sequence_parallel

from parallel.dist import device as current_device

with warnings.catch_warnings():
    # The package's __init__ warns about its own re-exports (megatron-core 0.16.1), not us.
    warnings.simplefilter("ignore", DeprecationWarning)
    from megatron.core.inference.contexts.static_context import StaticInferenceContext
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding


def attention_mask(padding: torch.Tensor, start: int) -> torch.Tensor:
    """Blocked-attention mask for query slots [start, T) against key slots [0, T).

    padding [b, T] bool, True at pad slots -> [b, 1, T - start, T] bool, True where query
    slot q may NOT see key slot k: k > q (causal), or k is a pad slot. A pad query still
    sees itself: a fully blocked row would give NaN from the softmax, and NaN values in the
    cache poison later rows even at zero weight (0 * NaN). Pad outputs are never read."""
    total = padding.shape[1]
    q = torch.arange(start, total, device=padding.device).view(-1, 1)
    k = torch.arange(total, device=padding.device).view(1, -1)
    future = k > q  # [sq, T]
    pad_key = padding[:, None, None, :] & (k != q)  # [b, 1, sq, T]
    return future | pad_key


def real_vocab_size(engine: Any, vocab_size: Optional[int] = None) -> int:
    """The vocabulary to sample from: the tokenizer's, so that the padding rows of the
    embedding (random, never trained) are never drawn. The engine's `vocab_size` when it
    records one, else the padded size of the model."""
    padded = int(engine.module.vocab_size) if engine.topo.is_last_stage else None
    size = vocab_size or getattr(engine, "vocab_size", None) or padded
    if size is None:  # a non-last stage never looks at logits
        return 0
    if padded is not None and size > padded:
        raise ValueError(f"vocab_size={size}: larger than the model's padded vocabulary {padded}")
    return int(size)


def _forget_inference_tensors() -> None:
    """Drop what megatron memoised during inference-mode steps: RotaryEmbedding.forward keeps
    its [seq, 1, 1, dim] tables in an lru_cache, and a table made under torch.inference_mode is
    an inference tensor, which a later training step (a fused RoPE kernel saving it for
    backward) may not use. Training rebuilds a table on its first call (microseconds)."""
    for cls in (RotaryEmbedding, YarnRotaryEmbedding):
        cls.forward.cache_clear()


class IncrementalForward:
    """Next-token logits of a growing batch through every pipeline stage of `engine`.

    Use as a context manager: on entry the module goes to eval mode with sequence
    parallelism off (a one-token decode step cannot be split over TP ranks) and the cache is
    created; on exit both are restored and the cache freed. Collective over the engine's
    model-parallel group (TP x PP): every rank calls `next_logits` and `share` in step."""

    def __init__(self, engine: Any, batch_size: int, max_length: int, vocab_size: int,
                 use_cache: bool = True) -> None:
        if engine.model_cfg.head != "lm":
            raise ValueError(f"model.head={engine.model_cfg.head}: generation needs the LM head")
        self.module = engine.module
        self.topo = engine.topo
        self.batch_size, self.max_length = batch_size, max_length
        self.vocab_size = vocab_size
        self.use_cache = use_cache
        self.device = current_device()
        self.context: Optional[StaticInferenceContext] = None
        self._was_training = False
        self._was_sequence_parallel = False

    # -- set-up and tear-down ------------------------------------------------------------
    def __enter__(self) -> "IncrementalForward":
        self._was_training = self.module.training
        self._was_sequence_parallel = bool(self.module.config.sequence_parallel)
        self.module.eval()
        if self._was_sequence_parallel:
            set_model_to_sequence_parallel(self.module, False)
        if self.use_cache:
            self.context = StaticInferenceContext(self.batch_size, self.max_length)
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.context = None  # frees the KV buffers
        _forget_inference_tensors()
        if not self.topo.is_first_stage:
            self.module.set_input_tensor(None)  # drop our last hidden states
        if self._was_sequence_parallel:
            set_model_to_sequence_parallel(self.module, True)
        self.module.train(self._was_training)

    @property
    def cached_length(self) -> int:
        """Slots whose keys and values are cached (0 without a cache)."""
        return self.context.sequence_len_offset if self.context is not None else 0

    # -- one step ------------------------------------------------------------------------
    @torch.inference_mode()
    def next_logits(self, tokens: torch.Tensor, positions: torch.Tensor,
                    padding: torch.Tensor) -> Optional[torch.Tensor]:
        """The distribution over the token after slot T-1, for every row.

        tokens, positions [b, T] long and padding [b, T] bool (True = pad slot): the whole
        sequences so far, on `self.device`, identical on every rank of the model-parallel
        group. With the cache only slots [cached_length, T) are run, and they are cached.
        -> logits [b, vocab_size] float32 on the last stage (the same on every TP rank),
        None on the other stages."""
        b, total = tokens.shape
        if b != self.batch_size or total > self.max_length:
            raise ValueError(f"next_logits: batch {b} x length {total} outside the cache's "
                             f"{self.batch_size} x {self.max_length}")
        start = self.cached_length
        if start >= total:
            raise ValueError(f"next_logits: no new slot ({total} given, {start} cached)")
        # No pad slot anywhere (prompts of one length): the causal rule alone applies, which
        # megatron's layers take from their mask type (causal at the prefill, nothing to
        # block for a last-slot query after it): no mask to build or apply.
        mask = attention_mask(padding, start) if bool(padding.any()) else None
        if not self.topo.is_first_stage:
            self.module.set_input_tensor(self._receive(total - start, b))
        first = self.topo.is_first_stage
        output = self.module(
            tokens[:, start:] if first else None,
            positions[:, start:] if first else None,
            mask,
            inference_context=self.context,
            # Megatron's inference path requires the gather; it materialises the last slot only.
            runtime_gather_output=self.context is not None,
        )
        if self.context is not None:
            self.context.increment_sequence_len_offset(total - start)
        if not self.topo.is_last_stage:
            self._send(output)
            return None
        return self._last_logits(output)

    def _last_logits(self, output: torch.Tensor) -> torch.Tensor:
        """output [b, s, V or V/tp] -> [b, vocab_size] float32, the full vocabulary."""
        last = output[:, -1, :]
        if self.context is None and self.topo.tp > 1:
            # Only the last slot is gathered: all-gather along the vocab (last) dim, in TP order.
            last = tensor_parallel.gather_from_tensor_model_parallel_region(last.contiguous())
        return last[:, : self.vocab_size].float()

    def _receive(self, seq: int, batch: int) -> torch.Tensor:
        hidden = torch.empty(seq, batch, self.module.config.hidden_size,
                             dtype=self.module.config.pipeline_dtype, device=self.device)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank(), group=self.topo.pp_group)
        return hidden

    def _send(self, hidden: torch.Tensor) -> None:
        """hidden [s, b, h] to the next stage, in the dtype `_receive` allocates."""
        hidden = hidden.to(self.module.config.pipeline_dtype).contiguous()
        dist.send(hidden, dst=ps.get_pipeline_model_parallel_next_rank(), group=self.topo.pp_group)

    # -- keeping the ranks in step -------------------------------------------------------
    def share(self, values: torch.Tensor) -> torch.Tensor:
        """The last stage's `values` on every rank of the model-parallel group.

        Every rank passes a tensor of the same shape and dtype on `self.device` (other
        stages a placeholder); all get the copy of the last stage's TP rank 0. The TP ranks
        of the last stage already agree (same gathered logits, same seeded generator); the
        TP broadcast makes that a guarantee rather than an assumption."""
        values = values.to(self.device).contiguous()
        if self.topo.is_last_stage and self.topo.tp > 1:
            dist.broadcast(values, src=ps.get_tensor_model_parallel_src_rank(),
                           group=self.topo.tp_group)
        if self.topo.pp > 1:
            dist.broadcast(values, src=self.topo.last_stage_global_rank, group=self.topo.pp_group)
        return values
