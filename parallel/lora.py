"""LoRA on megatron's tensor-parallel linear layers (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models"): y = W x + (alpha / r) B A x, A [r, in], B [out, r].

The adapters follow their layer's TP split, so no weight ever moves between ranks:

- ColumnParallelLinear (linear_qkv, linear_fc1) splits W by output rows. A [r, in] is
  replicated and B [out/tp, r] is split like W. u = A x is the same on every rank; its
  gradient sums every rank's B-shard share, so u passes through megatron's
  copy_to_tensor_model_parallel_region (identity forward, all-reduce backward): r numbers per
  token cross the TP group, not `in`.
- RowParallelLinear (linear_proj, linear_fc2) splits W by input columns. A [r, in/tp] is
  split like W and its u is a partial sum, all-reduced over TP (as the layer's own output)
  before the replicated B [out, r].
- With sequence parallelism those become all-gather / reduce-scatter over the tokens, and
  the replicated factor's gradient, now a per-rank partial sum over its tokens, is summed
  over TP by megatron's finalize_model_grads (the `sequence_parallel` attribute, as for
  layer norms).

The adapters are parameters `lora_a` and `lora_b` registered on the linear module itself,
so checkpoint keys sit next to the weight's (`decoder.layers.self_attention.linear_qkv.lora_a`)
and are sharded the same way, which makes them layout-independent like every other tensor
(parallel/model.py draws them from their key, B zero: a fresh adapter changes nothing). A
forward hook adds the low-rank path; the layer's class, forward and weight keys stay megatron's.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from chatforge_config.parallel import LORA_TARGETS, LoRAConfig, lora_targets

ADAPTER_NAMES: tuple[str, ...] = ("lora_a", "lora_b")


def is_adapter_key(key: str) -> bool:
    """A parameter name or checkpoint key of an adapter factor."""
    return key.rsplit(".", 1)[-1] in ADAPTER_NAMES


def lora_active(lora: Optional[LoRAConfig]) -> bool:
    return lora is not None and int(lora.rank) > 0


@dataclass
class _Adapter:
    """What an adapted linear keeps besides its two parameters."""

    column: bool  # ColumnParallelLinear (else RowParallelLinear)
    scale: float  # alpha / rank
    dropout: float
    # SwiGLU's fc1: each rank's rows are [gate shard; up shard]; B is saved like W (two halves).
    glu: bool
    hook: Any
    sharded_state_dict: Callable[..., dict[str, Any]]  # the layer's own
    enabled: bool = True


def adapted_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if hasattr(m, "_lora")]


def add_adapters(module: torch.nn.Module, lora: LoRAConfig) -> int:
    """Give every targeted linear of `module` (this rank's pipeline stage) zero adapters of
    `lora`; their values come from init_weights or a checkpoint. Returns how many."""
    targets = set(lora_targets(lora))
    unknown = targets - set(LORA_TARGETS)
    if unknown or not targets:
        raise ValueError(f"lora.targets={lora.targets}: choose among {', '.join(LORA_TARGETS)}")
    layers = [(name, m) for name, m in module.named_modules() if name.rsplit(".", 1)[-1] in targets]
    for name, linear in layers:
        glu = name.endswith("linear_fc1") and bool(linear.config.gated_linear_unit)
        _attach(linear, lora, glu)
    embedding = getattr(module, "embedding", None)
    config = getattr(module, "config", None)
    if embedding is not None and getattr(config, "recompute_granularity", None) == "full":
        # Full recomputation checkpoints each layer block reentrantly: a block whose input
        # needs no grad returns outputs that need none, and its adapters would never learn.
        # The frozen embedding's output is such an input (as PEFT's enable_input_require_grads).
        embedding.register_forward_hook(_require_grad)
    return len(layers)


def _require_grad(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Optional[torch.Tensor]:
    if torch.is_grad_enabled() and not output.requires_grad:
        return output.requires_grad_()
    return None


def _attach(linear: torch.nn.Module, lora: LoRAConfig, glu: bool) -> None:
    column = isinstance(linear, ColumnParallelLinear)
    if not column and not isinstance(linear, RowParallelLinear):
        raise TypeError(f"LoRA adapts megatron's parallel linear layers, not {type(linear).__name__}")
    if hasattr(linear, "_lora") or (column and linear.gather_output):
        raise ValueError(f"cannot adapt {linear}: it has adapters already or gathers its output")
    weight = linear.weight
    rank = int(lora.rank)
    out_local, in_local = weight.shape
    make = functools.partial(torch.zeros, dtype=weight.dtype, device=weight.device)
    a = torch.nn.Parameter(make(rank, in_local))  # column: the whole input; row: this rank's
    b = torch.nn.Parameter(make(out_local, rank))  # column: this rank's rows; row: all rows
    split, replicated = (b, a) if column else (a, b)
    # The split factor counts on every TP rank in the grad norm, the replicated one once.
    tensor_parallel.set_tensor_model_parallel_attributes(split, True, 0 if column else 1, 1)
    replicated.sequence_parallel = bool(linear.sequence_parallel)
    linear.register_parameter("lora_a", a)
    linear.register_parameter("lora_b", b)
    _install(linear, _Adapter(column, float(lora.alpha) / rank, float(lora.dropout), glu,
                              hook=None, sharded_state_dict=linear.sharded_state_dict))


def _install(linear: torch.nn.Module, spec: _Adapter) -> None:
    spec.hook = linear.register_forward_hook(_add_low_rank, with_kwargs=True)
    linear._lora = spec
    # An instance attribute shadows the class method: megatron's modules call it by name.
    linear.sharded_state_dict = functools.partial(_sharded_state_dict, linear)


def _detach(linear: torch.nn.Module) -> tuple[_Adapter, torch.nn.Parameter, torch.nn.Parameter]:
    """Remove the adapters from `linear`; return them (the same objects, to put back)."""
    spec = linear._lora
    spec.hook.remove()
    del linear._lora
    del linear.sharded_state_dict
    return spec, linear._parameters.pop("lora_a"), linear._parameters.pop("lora_b")


def _reattach(linear: torch.nn.Module, spec: _Adapter, a: torch.nn.Parameter, b: torch.nn.Parameter) -> None:
    linear.register_parameter("lora_a", a)
    linear.register_parameter("lora_b", b)
    _install(linear, spec)


def _add_low_rank(linear: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                  output: tuple[torch.Tensor, Optional[torch.Tensor]]) -> Any:
    """Forward hook: (W x [+ b], bias) -> (W x [+ b] + (alpha/r) B A x, bias)."""
    spec: _Adapter = linear._lora
    if not spec.enabled:
        return None
    x = args[0] if args else kwargs["input_"]
    out, bias = output
    return out + _low_rank(linear, spec, x).to(out.dtype), bias


def _low_rank(linear: torch.nn.Module, spec: _Adapter, x: torch.Tensor) -> torch.Tensor:
    """(alpha/r) B A dropout(x) for this rank: [s, b, out/tp] (column) or [s, b, out] (row;
    [s/tp, b, out] with sequence parallelism, like the layer's output)."""
    group, sp = linear.tp_group, bool(linear.sequence_parallel)
    # A column layer's input is the same on every TP rank (unless SP splits the tokens), so
    # its dropout mask must be too: the default generator. Split inputs: per-rank stream.
    x = _dropout(x, spec.dropout, linear.training, per_rank=sp or not spec.column)
    u = F.linear(x, linear.lora_a)
    if spec.column:
        u = gather_from_sequence_parallel_region(u, group=group) if sp \
            else copy_to_tensor_model_parallel_region(u, group=group)
    else:
        u = reduce_scatter_to_sequence_parallel_region(u, group=group) if sp \
            else reduce_from_tensor_model_parallel_region(u, group=group)
    return F.linear(u, linear.lora_b) * spec.scale


def _dropout(x: torch.Tensor, p: float, training: bool, per_rank: bool) -> torch.Tensor:
    if p <= 0.0 or not training:
        return x
    fork = tensor_parallel.get_cuda_rng_tracker().fork() if per_rank else contextlib.nullcontext()
    with fork:
        return F.dropout(x, p, training=True)


def _sharded_state_dict(linear: torch.nn.Module, prefix: str = "", sharded_offsets: tuple = (),
                        metadata: Optional[dict] = None) -> dict[str, Any]:
    """The layer's own entries, with the adapters sharded as described in the module
    docstring (megatron's default would save both as replicated)."""
    spec: _Adapter = linear._lora
    state = spec.sharded_state_dict(prefix, sharded_offsets, metadata)
    adapters = {name: getattr(linear, name) for name in ADAPTER_NAMES}
    axis = {"lora_b": 0} if spec.column else {"lora_a": 1}
    sharded = make_sharded_tensors_for_checkpoint(adapters, prefix, axis, sharded_offsets,
                                                  tp_group=linear.tp_group,
                                                  dp_cp_group=(metadata or {})["dp_cp_group"])
    if spec.glu:
        key = f"{prefix}lora_b"
        sharded[key] = apply_swiglu_sharded_factory(
            sharded[key], sharded_offsets, (metadata or {}).get("singleton_local_shards", False))
    state.update(sharded)
    return state


def init_full(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A whole adapter factor (any stacked-layer axes first): A as PEFT's kaiming-uniform
    (bound 1/sqrt(fan_in)), B zero so that training starts from the base model exactly."""
    if name == "lora_b":
        return torch.zeros(shape)
    bound = 1.0 / shape[-1] ** 0.5
    return (torch.rand(shape, generator=gen) * 2.0 - 1.0) * bound


def freeze_base(module: torch.nn.Module, train_head: bool) -> None:
    """Only the adapters train, and a scalar head (a reward model's or critic's, new and
    tiny: it must learn). Frozen parameters get no grad buffer and no optimizer state."""
    for name, param in module.named_parameters():
        param.requires_grad_(is_adapter_key(name) or (train_head and name.startswith("output_layer.")))


@torch.no_grad()
def merge_adapters(module: torch.nn.Module) -> int:
    """Fold every adapter into its layer, W += (alpha/r) B A, and remove it: `module` is a
    plain megatron model again, with the adapted model's outputs. Both factors are local
    to a shard (a column layer's B rows, a row layer's A columns are this rank's part of
    W), so each rank merges its own shard. Returns the number of layers merged."""
    layers = adapted_layers(module)
    for linear in layers:
        spec, a, b = _detach(linear)
        delta = (b.float() @ a.float()) * spec.scale
        linear.weight.add_(delta.to(linear.weight.dtype))
    return len(layers)


@contextlib.contextmanager
def swapped_adapters(module: torch.nn.Module, lora: LoRAConfig) -> Iterator[None]:
    """Give `module` fresh adapters of `lora` for the block (to load another checkpoint's
    adapters and merge them), setting its own aside; they come back, the same parameter
    objects (DDP and the optimizer hold them), afterwards."""
    stash = [(linear, _detach(linear)) for linear in adapted_layers(module)]
    try:
        add_adapters(module, lora)
        yield
    finally:
        for linear in adapted_layers(module):
            _detach(linear)  # whatever the block did not merge
        for linear, parts in stash:
            _reattach(linear, *parts)


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module) -> Iterator[None]:
    """The base model for the block: every adapter's hook passes the layer's output through."""
    layers = adapted_layers(module)
    for linear in layers:
        linear._lora.enabled = False
    try:
        yield
    finally:
        for linear in layers:
            linear._lora.enabled = True


class WithoutAdapters:
    """A forward-only view of a LoRA engine with its adapters off: its frozen base, which is
    exactly the model ckpt.load gave it. DPO's and PPO's reference when the policy trains
    adapters, instead of a second copy of the weights. Offers the engine's forward_outputs
    (the step function runs the model, so the adapters are off for its forward)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def forward_outputs(self, microbatches: list[dict[str, torch.Tensor]], step_fn: Callable[..., Any],
                        seq_length: Optional[int] = None) -> list[dict[str, torch.Tensor]]:
        def step(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> Any:
            with adapters_disabled(model):
                return step_fn(batch, model)

        return self.engine.forward_outputs(microbatches, step, seq_length=seq_length)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)
