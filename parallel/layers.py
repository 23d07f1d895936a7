"""Layer choices for the local (no Transformer Engine) GPT spec.

Megatron's local `DotProductAttention` materialises the [b, heads, s, s] scores: baddbmm,
an out-of-place masked_fill, softmax, bmm, and the same again backwards. On a CPU that is
about half of the step time outside the GEMMs (measured by tools/bench/pretrain_throughput.py:
a 4-layer, 256-hidden, seq-256 GPT spent ~0.6 s of a 1.5 s step there). torch's
`scaled_dot_product_attention` does the same maths in one fused kernel (flash attention on
CPU and GPU), so our spec swaps it in as the core attention; everything else in the layer
(QKV and output projections, TP splits, checkpoint keys) stays megatron's.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Core attention (the softmax(QK^T/sqrt(d))V part) through
    `F.scaled_dot_product_attention`; a drop-in for megatron's `DotProductAttention`.

    Masks follow megatron: `attention_mask` is boolean, True where attention is *blocked*,
    broadcastable to [b, heads, sq, sk]; None with a causal layer means the causal mask
    (SDPA's `is_causal`, which also lets the kernel skip the blocked half)."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Any = None) -> None:
        super().__init__(config=config)
        _check_supported(config)
        tp = pg_collection.tp.size() if pg_collection is not None else config.tensor_model_parallel_size
        self.attn_mask_type = attn_mask_type
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        head_dim = config.kv_channels
        # apply_query_key_layer_scaling divides the scores by the layer number and multiplies
        # them back inside the fp32 softmax: the net scale is 1/sqrt(d) either way.
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params: Any = None) -> torch.Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np * hn]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed sequences and attention bias are not supported")
        if self.heads != self.groups:
            # Grouped-query attention: repeat the KV heads, as megatron's local attention does.
            key = key.repeat_interleave(self.heads // self.groups, dim=2)
            value = value.repeat_interleave(self.heads // self.groups, dim=2)
        # [s, b, n, d] -> [b, n, s, d]: views, the kernel takes strided inputs.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        allowed = None if attention_mask is None else ~attention_mask
        dropout = self.dropout if self.training else 0.0
        with _rng_fork(dropout > 0.0 and not self.config.sequence_parallel):
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                                     is_causal=causal, scale=self.scale)
        sq, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)


def _rng_fork(active: bool) -> Any:
    """Attention dropout draws from megatron's model-parallel RNG stream (different on each
    TP rank, as in DotProductAttention); without dropout no stream is touched."""
    return tensor_parallel.get_cuda_rng_tracker().fork() if active else contextlib.nullcontext()


def _check_supported(config: TransformerConfig) -> None:
    """Fail at build time on megatron attention features this module does not implement."""
    unsupported = {
        "context_parallel_size": config.context_parallel_size != 1,
        "softmax_type": config.softmax_type != "vanilla",
        "window_size": config.window_size is not None,
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"SDPAttention does not support TransformerConfig {', '.join(bad)}")


class GradFreeLinear:
    """`_forward_impl` of one of megatron's column/row-parallel linears (set on the instance by
    `use_grad_free_linears`). When autograd records nothing (under torch.no_grad, or neither
    the weight nor the input requires grad) and no sequence-parallel all-gather is due,
    megatron's autograd Functions (LinearWithGradAccumulationAndAsyncCommunication,
    LinearWithFrozenWeight) compute exactly `matmul(input, weight.t())` (+ bias) in their
    forward: this runs those two ops directly, so the result is bit for bit the same at any
    TP size, without the Function's Python (context set-up, saved tensors, group look-up),
    which was about a fifth of a KV-cache decode step on CPU (tools/bench/generation.py).
    Anything that trains or gathers goes through megatron's own path."""

    def __init__(self, original: Any) -> None:
        self.original = original

    def __call__(self, input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        recorded = torch.is_grad_enabled() and (weight.requires_grad or input.requires_grad)
        if args or recorded or kwargs.get("sequence_parallel"):
            return self.original(input, weight, *args, **kwargs)
        output = torch.matmul(input, weight.t())
        bias = kwargs.get("bias")
        return output + bias if bias is not None else output


def use_grad_free_linears(module: torch.nn.Module) -> None:
    """Give every column/row-parallel linear in `module` the `GradFreeLinear` forward path."""
    for layer in module.modules():
        if isinstance(layer, (tensor_parallel.ColumnParallelLinear, tensor_parallel.RowParallelLinear)) \
                and not isinstance(layer.__dict__.get("_forward_impl"), GradFreeLinear):
            layer._forward_impl = GradFreeLinear(layer._forward_impl)


class TP1TrainingLinear:
    """`forward` of one of megatron's column/row-parallel linears whose TP group has one rank
    (set on the instance by `use_tp1_training_linears`). When autograd records the call (a
    training forward), megatron computes `matmul` in its autograd Function (Python forward
    and backward, context set-up) and adds the bias as a separate pass: after the Function
    (row-parallel), or in the caller (skip_bias_add: bias-dropout-add, the MLP's bias before
    its activation). This computes `F.linear(input, weight, bias)` instead: one addmm, one
    native autograd node, the bias folded in. At TP=1 every region mapping is the identity,
    so the maths is the same; the rounding may differ in the last bit (addmm's bias enters
    the GEMM's accumulation), hence the TP1 training test compares with a tight tolerance.
    Gradients reach the parameters through ordinary AccumulateGrad, where megatron's DDP
    hooks copy them into its main_grad buckets, as with megatron's Function (without
    gradient_accumulation_fusion, which this path is never installed with).

    `fuse_skipped_bias`: the layer returns its bias for the caller to add (skip_bias_add) and
    the caller accepts None instead (checked by the installer), so the bias is folded in here
    too. Not recorded by autograd (generation, frozen models), or with a weight of the wrong
    shape (megatron's forward raises) or CPU offloading, it calls megatron's forward: those
    results stay bit for bit."""

    def __init__(self, layer: torch.nn.Module, fuse_skipped_bias: bool) -> None:
        self.original = layer.forward  # the class's bound method
        self.layer = layer
        self.fuse_bias = layer.bias is not None and (fuse_skipped_bias or not layer.skip_bias_add)

    def __call__(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                 *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        layer = self.layer
        own = weight is None
        w = layer.weight if own else weight  # a tied output layer is given the embedding's
        recorded = w is not None and torch.is_grad_enabled() and (w.requires_grad or input_.requires_grad)
        if not recorded or layer.config._cpu_offloading_context is not None \
                or (not own and tuple(w.shape) != (layer.output_size_per_partition, layer.input_size)):
            # Row-parallel forward takes the input only; column-parallel also (weight, gather).
            return self.original(input_, weight, *args, **kwargs) if not own or args \
                else self.original(input_, **kwargs)
        if self.fuse_bias:
            return F.linear(input_, w, layer.bias), None
        return F.linear(input_, w), layer.bias if layer.skip_bias_add else None


def _tp1_training_eligible(layer: torch.nn.Module) -> bool:
    """The layers `TP1TrainingLinear` computes exactly as megatron would: a one-rank TP group,
    and none of the features whose work is in megatron's Function (sequence parallelism's
    gathers, fused weight-gradient accumulation into main_grad, deferred embedding wgrads,
    expert communication)."""
    config = layer.config
    return (layer.tp_group.size() == 1 and not layer.sequence_parallel
            and not layer.gradient_accumulation_fusion and not config.defer_embedding_wgrad_compute
            and not getattr(layer, "explicit_expert_comm", False) and not getattr(layer, "is_expert", False))


def _accepts_folded_bias(name: str, layer: torch.nn.Module) -> bool:
    """Whether the caller of a skip_bias_add linear takes None for its bias: the transformer
    layer's bias-dropout-add (attention's linear_proj, the MLP's linear_fc2 output) does, and
    the MLP adds linear_fc1's bias before its activation only if there is one, unless a fused
    bias-activation kernel wants the bias itself."""
    if name.endswith(("self_attention.linear_proj", "mlp.linear_fc2")):
        return True
    return name.endswith("mlp.linear_fc1") and not layer.config.bias_activation_fusion


def use_tp1_training_linears(module: torch.nn.Module) -> None:
    """Give every eligible column/row-parallel linear in `module` the `TP1TrainingLinear`
    forward (idempotent; layers in a TP group of several ranks keep megatron's)."""
    for name, layer in module.named_modules():
        if isinstance(layer, (tensor_parallel.ColumnParallelLinear, tensor_parallel.RowParallelLinear)) \
                and not isinstance(layer.__dict__.get("forward"), TP1TrainingLinear) \
                and _tp1_training_eligible(layer):
            layer.forward = TP1TrainingLinear(layer, _accepts_folded_bias(name, layer))


# megatron's TP "region" mappings as its parallel layers call them (names imported into
# megatron.core.tensor_parallel.layers). With a one-rank TP group each is the identity both
# ways (forward and backward return their input: megatron's own _reduce/_gather/copy at world
# size 1), yet each call builds an autograd Function node in Python.
_REGIONS = ("copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
            "gather_from_tensor_model_parallel_region")


class _IdentityAtTP1:
    """A region mapping that returns its input when the TP group has one rank (the same
    tensor values forward and backward, so results are bit for bit those of megatron's
    Function) and calls megatron's mapping otherwise (TP > 1 untouched)."""

    def __init__(self, mapping: Any) -> None:
        self.mapping = mapping

    def __call__(self, input_: torch.Tensor, group: Any = None) -> torch.Tensor:
        if group is not None and group.size() == 1:
            return input_
        return self.mapping(input_, group=group)


def skip_tp1_regions() -> None:
    """Install `_IdentityAtTP1` for megatron's parallel layers (idempotent; process-wide, and
    a no-op for any layer whose TP group has more than one rank). About a sixth of a KV-cache
    decode step on CPU (tools/bench/generation.py), and the same Python per layer in training."""
    from megatron.core.tensor_parallel import layers as megatron_layers

    for name in _REGIONS:
        current = getattr(megatron_layers, name)
        if not isinstance(current, _IdentityAtTP1):
            setattr(megatron_layers, name, _IdentityAtTP1(current))


@contextlib.contextmanager
def megatron_paths(module: torch.nn.Module) -> Any:
    """Within: `module`'s linears and every region mapping take megatron's own paths (the
    autograd Functions), as before `use_grad_free_linears` / `use_tp1_training_linears` /
    `skip_tp1_regions`. For the
    benchmark's before/after in one run and for the tests that the results are bit for bit
    the same."""
    from megatron.core.tensor_parallel import layers as megatron_layers

    linears = [m for m in module.modules() if isinstance(m.__dict__.get("_forward_impl"), GradFreeLinear)]
    trained = {m: m.__dict__["forward"] for m in module.modules()
               if isinstance(m.__dict__.get("forward"), TP1TrainingLinear)}
    regions = {name: getattr(megatron_layers, name) for name in _REGIONS}
    for layer in linears:
        layer._forward_impl = layer._forward_impl.original
    for layer in trained:
        del layer.forward  # the class's forward again
    for name, current in regions.items():
        setattr(megatron_layers, name, getattr(current, "mapping", current))
    try:
        yield
    finally:
        for layer in linears:
            layer._forward_impl = GradFreeLinear(layer._forward_impl)
        for layer, fast in trained.items():
            layer.forward = fast
        for name, current in regions.items():
            setattr(megatron_layers, name, current)


class CausalMaskElision:
    """GPTModel forward pre-hook: an `attention_mask` that is exactly the causal triangle is
    replaced by None, which `SDPAttention` (a causal layer) runs as `is_causal=True`: the
    kernel then skips the blocked half instead of reading a mask, and on a GPU it may use
    the flash kernel (an explicit mask rules that out). Any other mask (padding, packed
    documents) passes through unchanged. Checked once per micro batch (one small compare;
    on a GPU it waits for the device once, not once per layer)."""

    def __init__(self) -> None:
        self._triangles: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Optional[tuple[tuple[Any, ...], dict[str, Any]]]:
        # GPTModel.forward(input_ids, position_ids, attention_mask, ...)
        in_args = len(args) > 2
        mask = args[2] if in_args else kwargs.get("attention_mask")
        if mask is None or not self._is_causal(mask):
            return None
        if in_args:
            return (*args[:2], None, *args[3:]), kwargs
        return args, {**kwargs, "attention_mask": None}

    def _is_causal(self, mask: torch.Tensor) -> bool:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
            return False
        seq = mask.shape[-1]
        if mask.shape[-2] != seq:
            return False
        key = (seq, mask.device)
        if key not in self._triangles:
            self._triangles[key] = torch.ones(seq, seq, dtype=torch.bool, device=mask.device).triu(1)
        return torch.equal(mask, self._triangles[key].expand_as(mask))


def gpt_layer_spec(normalization: str, layer_spec: str = "local") -> ModuleSpec:
    """parallel.layer_spec "local": megatron's local GPT layer spec with `SDPAttention` as the
    core attention. "te": megatron's Transformer Engine spec (fused LayerNorm+linear, TE's
    fused/flash attention; the norm type comes from the TransformerConfig), which needs a GPU
    and an importable transformer_engine."""
    if layer_spec == "local":
        spec = get_gpt_layer_local_spec(normalization=normalization)
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
        return spec
    if layer_spec != "te":
        raise ValueError(f"parallel.layer_spec={layer_spec!r}: must be 'local' or 'te'")
    if not torch.cuda.is_available():
        raise ValueError("parallel.layer_spec=te: Transformer Engine needs a CUDA device; use local on CPU")
    try:
        import transformer_engine  # noqa: F401
    except Exception as exc:
        raise ValueError(f"parallel.layer_spec=te: transformer_engine does not import ({exc}); install it "
                         "or use parallel.layer_spec=local") from exc
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec()
