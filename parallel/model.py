"""Build a Megatron GPTModel (this rank's pipeline stage) from a ModelConfig.

Model definition is megatron's; this module chooses layers (the local spec with SDPA core
attention, parallel/layers.py), fills the TransformerConfig from our schema, and initialises
weights so that the same seed gives the same full model at every TP/PP layout (each tensor is drawn whole from a generator seeded
by its global checkpoint key, then this rank takes its shard).
"""
from __future__ import annotations

import zlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from chatforge_config.parallel import LoRAConfig, ModelConfig, ParallelConfig, ffn_size
from parallel.groups import Topology
from parallel.layers import (CausalMaskElision, gpt_layer_spec, skip_tp1_regions, use_grad_free_linears,
                             use_tp1_training_linears)
from parallel.lora import ADAPTER_NAMES, add_adapters, lora_active
from parallel.lora import init_full as init_adapter


def padded_vocab_size(vocab_size: int, model: ModelConfig, parallel: ParallelConfig) -> int:
    """Pad the vocabulary to a multiple of `model.make_vocab_size_divisible_by`.

    Unlike Megatron-LM we do not multiply the multiple by TP: the padded size (and so the
    embedding's shape and every logit) stays the same at every layout, which is what lets a
    checkpoint load at another TP and a TP2 run match TP1. TP must divide the padded size."""
    multiple = model.make_vocab_size_divisible_by
    padded = ((vocab_size + multiple - 1) // multiple) * multiple
    if padded % parallel.tp != 0:
        raise ValueError(
            f"parallel.tp={parallel.tp}: does not divide the padded vocabulary {padded} "
            f"(model.make_vocab_size_divisible_by={multiple}); use a multiple of the TP size")
    return padded


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation: GPT-2's "gelu_new" (imported GPT-2 checkpoints need it to
    reproduce their logits; it differs from the erf GELU by up to 5e-4 per activation)."""
    return F.gelu(x, approximate="tanh")


# model.activation -> megatron's activation_func (swiglu: SiLU on the gated half).
ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "swiglu": F.silu}


def transformer_config(model: ModelConfig, parallel: ParallelConfig) -> TransformerConfig:
    on_gpu = torch.cuda.is_available()
    bf16 = parallel.precision == "bf16"
    if bf16 and not on_gpu:
        raise ValueError("parallel.precision=bf16: needs a CUDA device; use fp32 on CPU")
    recompute: dict[str, Any] = {}
    if parallel.recompute == "selective":
        recompute = {"recompute_granularity": "selective"}
    elif parallel.recompute == "full":
        recompute = {"recompute_granularity": "full", "recompute_method": "uniform",
                     "recompute_num_layers": parallel.recompute_num_layers}
    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=ffn_size(model),
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        layernorm_epsilon=model.layernorm_epsilon,
        normalization=model.normalization,
        add_bias_linear=model.add_bias,
        gated_linear_unit=model.activation == "swiglu",
        activation_func=ACTIVATIONS[model.activation],
        init_method_std=model.init_std,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        sequence_parallel=parallel.sequence_parallel and parallel.tp > 1,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        # Weights are drawn by `init_weights` below; megatron's own init would be thrown away.
        perform_initialization=False,
        use_cpu_initialization=not on_gpu,
        # Fused kernels exist only on CUDA (and some only with apex/TE).
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        bias_activation_fusion=on_gpu and model.activation == "gelu" and model.add_bias,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        # Token-weighted losses: the schedule sums per-token losses and the grads are divided
        # by the token count of the whole global batch (exact for masked SFT losses too).
        calculate_per_token_loss=True,
        # p2p on gloo is synchronous; batching it would call torch.cuda.synchronize().
        batch_p2p_comm=False,
        batch_p2p_sync=False,
        **recompute,
    )


class ScalarHead(torch.nn.Module):
    """One value per token from the final hidden state (reward model, critic). Replicated on
    every TP rank: it is tiny, and the value must not be split across the vocab dimension."""

    def __init__(self, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.sequence_parallel = False

    def forward(self, hidden: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None) -> tuple[torch.Tensor, None]:
        return F.linear(hidden, self.weight, self.bias), None


def build_model(model: ModelConfig, parallel: ParallelConfig, topo: Topology,
                vocab_size: int, seed: int, lora: Optional[LoRAConfig] = None) -> GPTModel:
    """This rank's stage of the GPT. `vocab_size` is the tokenizer's (padded here). With
    `lora` (rank > 0) the targeted layers get adapters (parallel/lora.py), drawn like weights."""
    config = transformer_config(model, parallel)
    # Megatron's local layers with fused SDPA core attention, or Transformer Engine's
    # (parallel.layer_spec; see parallel/layers.py).
    layer_spec = str(getattr(parallel, "layer_spec", "local"))  # configs from before the key lack it
    if layer_spec == "te" and lora_active(lora):
        raise ValueError("parallel.layer_spec=te with lora.rank > 0: LoRA adapts the local spec's "
                         "linears; use parallel.layer_spec=local")
    spec = gpt_layer_spec(model.normalization, layer_spec)
    scalar = model.head == "scalar"
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(vocab_size, model, parallel),
        max_sequence_length=model.seq_length,
        pre_process=topo.is_first_stage,
        post_process=topo.is_last_stage,
        share_embeddings_and_output_weights=model.tie_embeddings and not scalar,
        position_embedding_type="rope" if model.position_embedding == "rope" else "learned_absolute",
        rotary_base=model.rotary_base,
    )
    if scalar and topo.is_last_stage:
        gpt.output_layer = ScalarHead(model.hidden_size, config.params_dtype)
    if lora_active(lora):
        add_adapters(gpt, lora)
    gpt.register_forward_pre_hook(CausalMaskElision(), with_kwargs=True)
    use_grad_free_linears(gpt)  # generation and frozen models' forwards skip autograd's Python
    skip_tp1_regions()  # TP=1: megatron's identity region mappings skip their autograd nodes
    use_tp1_training_linears(gpt)  # TP=1 training: one addmm per linear, the bias folded in
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    _mark_tensor_parallel(gpt)
    init_weights(gpt, model, seed)
    return gpt


def _mark_tensor_parallel(gpt: GPTModel) -> None:
    """With perform_initialization=False megatron's parallel layers skip
    `set_tensor_model_parallel_attributes` on their weights, and then every TP rank counts
    its shard as a duplicate in the grad norm (wrong clipping). Restore the attributes."""
    for module in gpt.modules():
        if isinstance(module, (tensor_parallel.ColumnParallelLinear, tensor_parallel.VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, tensor_parallel.RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not getattr(weight, "tensor_model_parallel", False):
            tensor_parallel.set_tensor_model_parallel_attributes(weight, True, dim, 1)


def _init_full(key: str, shape: tuple[int, ...], model: ModelConfig, seed: int) -> torch.Tensor:
    name = key.rsplit(".", 1)[-1]
    if "norm" in key and name in ("weight", "layer_norm_weight"):
        return torch.ones(shape)
    if name.endswith("bias") or "output_layer" in key and model.head == "scalar":
        # A zero scalar head starts every reward/value at 0 (its bias too).
        return torch.zeros(shape)
    std = model.init_std
    if key.endswith("linear_proj.weight") or key.endswith("linear_fc2.weight"):
        # GPT-2's scaled init of the residual projections.
        std = std / (2.0 * model.num_layers) ** 0.5
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
    if name in ADAPTER_NAMES:
        return init_adapter(name, shape, gen)
    return torch.randn(shape, generator=gen) * std


@torch.no_grad()
def init_weights(gpt: GPTModel, model: ModelConfig, seed: int) -> None:
    """Draw every parameter whole from a generator keyed by (seed, checkpoint key), then keep
    this rank's shard: identical full weights at every layout. Costs one full-size tensor at
    a time on the host, which is acceptable at start-up."""
    covered: set[int] = set()
    for sharded in _sharded_tensors(gpt.sharded_state_dict()):
        full = _init_full(sharded.key, tuple(sharded.global_shape), model, seed)
        local = full
        prepend = sharded.prepend_axis_num
        for axis, offset in enumerate(sharded.global_offset):
            if axis < prepend:  # stacked-layer axes: index, which drops the axis
                local = local[offset]
            else:
                size = sharded.local_shape[axis - prepend]
                local = local.narrow(axis - prepend, offset, size)
        sharded.data.copy_(local.reshape(sharded.data.shape).to(sharded.data.dtype))
        covered.add(sharded.data.untyped_storage().data_ptr())
    # perform_initialization=False leaves torch.empty garbage in anything missed above.
    missed = [name for name, p in gpt.named_parameters()
              if p.untyped_storage().data_ptr() not in covered]
    if missed:
        raise RuntimeError(f"init_weights: no checkpoint key covers {missed}")


def _sharded_tensors(tree: Any) -> list[ShardedTensor]:
    """The ShardedTensors of a sharded state dict; factories (SwiGLU's fc1, stored as two
    halves) are built, which yields views into the parameter."""
    found: list[ShardedTensor] = []
    if isinstance(tree, ShardedTensorFactory):
        found.extend(_sharded_tensors(tree.build()))
    elif isinstance(tree, ShardedTensor):
        if tree.flattened_range is None:
            found.append(tree)
    elif isinstance(tree, dict):
        for value in tree.values():
            found.extend(_sharded_tensors(value))
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            found.extend(_sharded_tensors(value))
    return found
