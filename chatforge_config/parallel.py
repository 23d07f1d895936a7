"""Schemas owned by parallel/: model shape, parallel layout, optimizer.

Standard library only (chatforge_config/__init__.py): the launcher imports these to compose
and validate a config without paying for (or depending on) torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class ModelConfig:
    """Shape of a GPT decoder. The vocabulary comes from the tokenizer at build time and is
    padded to a multiple of `make_vocab_size_divisible_by * parallel.tp` (Megatron's rule)."""

    name: str = "tiny"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    # Grouped-query attention: None means one KV head per query head (plain MHA).
    num_query_groups: Optional[int] = None
    # None: 4 x hidden for gelu; for swiglu the conventional 8/3 x hidden rounded to 64.
    ffn_hidden_size: Optional[int] = None
    seq_length: int = 128
    position_embedding: str = "learned"  # learned | rope
    rotary_base: int = 10000
    normalization: str = "LayerNorm"  # LayerNorm | RMSNorm
    activation: str = "gelu"  # gelu (erf) | gelu_tanh (GPT-2's "gelu_new") | swiglu
    tie_embeddings: bool = True
    add_bias: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    layernorm_epsilon: float = 1e-5
    make_vocab_size_divisible_by: int = 128
    # lm: next-token logits over the vocabulary; scalar: one value per token (reward model, critic).
    head: str = "lm"


def ffn_size(model: Any) -> int:
    """The MLP width `model` (a ModelConfig or its DictConfig) builds: model.ffn_hidden_size,
    or its default, derived here once for the model builder and the launcher's plan."""
    if model.ffn_hidden_size:
        return int(model.ffn_hidden_size)
    if model.activation == "swiglu":
        # LLaMA's 2/3 * 4h keeps SwiGLU's parameter count equal to a 4h GELU MLP.
        return ((int(8 * model.hidden_size / 3) + 63) // 64) * 64
    return 4 * int(model.hidden_size)


@dataclass
class ParallelConfig:
    """Layout and memory savers. Data parallel size is derived: world / (tp * pp)."""

    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # Parameters per DDP gradient bucket with overlap_grad_reduce (null: megatron's default,
    # max(40M, 1M x DP)); without overlap megatron reduces one bucket after the backward.
    ddp_bucket_size: Optional[int] = None
    precision: str = "fp32"  # fp32 | bf16 (bf16 needs a GPU)
    recompute: str = "none"  # none | selective | full
    recompute_num_layers: int = 1
    # Which megatron layers build the GPT: "local" (megatron's local spec with SDPA core
    # attention, parallel/layers.py; any device) or "te" (Transformer Engine's fused layers
    # and attention: a GPU with transformer_engine installed; no LoRA; its checkpoints name
    # the fused layer norms differently, so they load only into te runs).
    layer_spec: str = "local"


@dataclass
class OptimConfig:
    name: str = "adamw"  # adam | adamw
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 10
    decay: str = "cosine"  # cosine | linear | constant
    # None: decay over train.steps.
    decay_steps: Optional[int] = None


# Megatron's names of the tensor-parallel linear layers LoRA can adapt: the attention's QKV
# and output projections (column-, row-parallel) and the MLP's two layers (likewise).
LORA_TARGETS: tuple[str, ...] = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021): W x + (alpha / rank) B A x on the targeted layers,
    B zero-initialised. With rank > 0 only the adapters (and a scalar head) train and are
    saved; the base weights stay frozen as ckpt.load had them. docs/lora.md."""

    rank: int = 0  # 0: off
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input only
    # Comma-separated, among LORA_TARGETS.
    targets: str = "linear_qkv,linear_proj,linear_fc1,linear_fc2"


def lora_targets(lora: LoRAConfig) -> list[str]:
    return [t.strip() for t in str(lora.targets).split(",") if t.strip()]


Problem = tuple[str, object, str]  # (config key, bad value, what is wrong)


def model_split_problems(model: ModelConfig, tp: int, pp: int) -> list[Problem]:
    """Megatron's rules for splitting this model over TP ranks and PP stages. The one home
    of these rules: the launcher checks them before submission, parallel.groups at start-up
    (for jobs started without the launcher)."""
    problems: list[Problem] = []
    heads, groups = model.num_attention_heads, model.num_query_groups
    if heads % tp:
        problems.append(("parallel.tp", tp, f"must divide model.num_attention_heads={heads}"))
    if model.hidden_size % heads:
        problems.append(("model.hidden_size", model.hidden_size,
                         f"must be a multiple of model.num_attention_heads={heads}"))
    if groups is not None and heads % groups:
        problems.append(("model.num_query_groups", groups,
                         f"must divide model.num_attention_heads={heads}"))
    if groups is not None and groups % tp:
        problems.append(("model.num_query_groups", groups, f"must be a multiple of parallel.tp={tp}"))
    ffn = model.ffn_hidden_size
    if ffn is not None and ffn % tp:
        problems.append(("model.ffn_hidden_size", ffn, f"must be a multiple of parallel.tp={tp}"))
    if model.make_vocab_size_divisible_by % tp:
        # The padded vocabulary is split evenly over TP ranks (see parallel.model).
        problems.append(("model.make_vocab_size_divisible_by", model.make_vocab_size_divisible_by,
                         f"must be a multiple of parallel.tp={tp}"))
    if model.num_layers % pp:
        problems.append(("model.num_layers", model.num_layers,
                         f"must be a multiple of parallel.pp={pp}"))
    return problems


def layout_problems(model: ModelConfig, parallel: ParallelConfig, world_size: int) -> list[Problem]:
    """The world must split into TP x PP x DP, and the model over TP and PP."""
    tp, pp = parallel.tp, parallel.pp
    for key, value in (("parallel.tp", tp), ("parallel.pp", pp)):
        if value < 1:
            return [(key, value, "must be >= 1")]
    if world_size % (tp * pp):
        return [("parallel.pp" if world_size % tp == 0 else "parallel.tp",
                 pp if world_size % tp == 0 else tp,
                 f"tp*pp = {tp}*{pp} must divide the world size {world_size}")]
    return model_split_problems(model, tp, pp)
