"""Schemas owned by parallel/: model shape, parallel layout, optimizer.

Torch-free on purpose: the launcher imports these to compose and validate a config
without paying for (or depending on) torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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
    activation: str = "gelu"  # gelu | swiglu
    tie_embeddings: bool = True
    add_bias: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    layernorm_epsilon: float = 1e-5
    make_vocab_size_divisible_by: int = 128
    # lm: next-token logits over the vocabulary; scalar: one value per token (reward model, critic).
    head: str = "lm"


@dataclass
class ParallelConfig:
    """Layout and memory savers. Data parallel size is derived: world / (tp * pp)."""

    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    precision: str = "fp32"  # fp32 | bf16 (bf16 needs a GPU)
    recompute: str = "none"  # none | selective | full
    recompute_num_layers: int = 1


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


def layout_problems(model: ModelConfig, parallel: ParallelConfig, world_size: int) -> list[tuple[str, object, str]]:
    """Every way the TP x PP layout does not fit the world or the model, as
    (config key, bad value, what is wrong). Shared by the launcher (before submission) and
    parallel.groups (at start-up, for jobs started without the launcher)."""
    problems: list[tuple[str, object, str]] = []
    for key, value in (("parallel.tp", parallel.tp), ("parallel.pp", parallel.pp)):
        if value < 1:
            problems.append((key, value, "must be >= 1"))
    if problems:
        return problems
    if world_size % (parallel.tp * parallel.pp) != 0:
        problems.append(("parallel.tp", parallel.tp,
                         f"tp x pp = {parallel.tp * parallel.pp} does not divide the world size "
                         f"{world_size} (cluster.nodes x cluster.procs_per_node)"))
    if model.num_attention_heads % parallel.tp != 0:
        problems.append(("parallel.tp", parallel.tp,
                         f"does not divide model.num_attention_heads={model.num_attention_heads}"))
    groups = model.num_query_groups
    if groups is not None and groups % parallel.tp != 0:
        problems.append(("parallel.tp", parallel.tp,
                         f"does not divide model.num_query_groups={groups}"))
    if model.num_layers % parallel.pp != 0:
        problems.append(("parallel.pp", parallel.pp,
                         f"does not divide model.num_layers={model.num_layers}"))
    return problems
