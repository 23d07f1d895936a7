"""Hugging Face <-> chatforge: one name table per architecture (used in both directions), the
tensor layouts they differ in, and the config translation. Imported by tools/hf_import.py and
tools/hf_export.py; needs torch, not transformers or megatron.

chatforge's names are the Megatron GPTModel's parameter names at TP1/PP1 (`{i}` is the layer):
the sharded checkpoint stores them by global key, so a TP1/PP1 copy loads at any TP/PP.

Layouts that differ (checked against transformers' forward by tests/dist/test_hf.py):
- GPT-2 keeps Conv1D weights as [in, out]; Megatron's linears are [out, in].
- Megatron fuses Q, K and V into one `linear_qkv` [(np + 2 ng) hn, h] grouped by KV group:
  for each of the ng groups, its np/ng query heads, then its key head, then its value head.
  HF has separate q/k/v projections (Llama) or one [q; k; v] block (GPT-2's c_attn).
- SwiGLU: Megatron's `linear_fc1` is [gate; up] stacked, HF has gate_proj and up_proj.
- The vocabulary: Megatron's embedding (and an untied output layer) has the padded
  vocabulary's rows (parallel.model.padded_vocab_size); HF's has the tokenizer's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from chatforge_config.parallel import ModelConfig, ffn_size

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """One chatforge tensor and the HF tensor(s) it is made of; `{i}` is the layer index.
    kind: copy | t (transposed: GPT-2's Conv1D) | qkv (Llama's q, k, v) | qkv_fused
    (GPT-2's [q; k; v] bias) | qkv_fused_t (GPT-2's c_attn Conv1D weight) | gate_up
    (SwiGLU) | vocab (rows are token ids: grown and padded on import, cut on export)."""

    ours: str
    theirs: tuple[str, ...]
    kind: str = "copy"


@dataclass(frozen=True)
class Arch:
    """An HF architecture chatforge reads and writes."""

    name: str  # config.json model_type
    lm_class: str  # transformers class of a language model
    score_class: str  # ... of a scalar-head (reward) model
    body: tuple[Rule, ...]
    prefix: str  # HF name prefix of the body (the score model's too)


_L, _G, _M = "decoder.layers.{i}.", "transformer.h.{i}.", "model.layers.{i}."
GPT2 = Arch("gpt2", "GPT2LMHeadModel", "GPT2ForSequenceClassification", prefix="transformer.", body=(
    Rule("embedding.word_embeddings.weight", ("transformer.wte.weight",), "vocab"),
    Rule("embedding.position_embeddings.weight", ("transformer.wpe.weight",)),
    Rule(_L + "input_layernorm.weight", (_G + "ln_1.weight",)),
    Rule(_L + "input_layernorm.bias", (_G + "ln_1.bias",)),
    Rule(_L + "self_attention.linear_qkv.weight", (_G + "attn.c_attn.weight",), "qkv_fused_t"),
    Rule(_L + "self_attention.linear_qkv.bias", (_G + "attn.c_attn.bias",), "qkv_fused"),
    Rule(_L + "self_attention.linear_proj.weight", (_G + "attn.c_proj.weight",), "t"),
    Rule(_L + "self_attention.linear_proj.bias", (_G + "attn.c_proj.bias",)),
    Rule(_L + "pre_mlp_layernorm.weight", (_G + "ln_2.weight",)),
    Rule(_L + "pre_mlp_layernorm.bias", (_G + "ln_2.bias",)),
    Rule(_L + "mlp.linear_fc1.weight", (_G + "mlp.c_fc.weight",), "t"),
    Rule(_L + "mlp.linear_fc1.bias", (_G + "mlp.c_fc.bias",)),
    Rule(_L + "mlp.linear_fc2.weight", (_G + "mlp.c_proj.weight",), "t"),
    Rule(_L + "mlp.linear_fc2.bias", (_G + "mlp.c_proj.bias",)),
    Rule("decoder.final_layernorm.weight", ("transformer.ln_f.weight",)),
    Rule("decoder.final_layernorm.bias", ("transformer.ln_f.bias",)),
))
LLAMA = Arch("llama", "LlamaForCausalLM", "LlamaForSequenceClassification", prefix="model.", body=(
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule(_L + "input_layernorm.weight", (_M + "input_layernorm.weight",)),
    Rule(_L + "self_attention.linear_qkv.weight",
         (_M + "self_attn.q_proj.weight", _M + "self_attn.k_proj.weight", _M + "self_attn.v_proj.weight"), "qkv"),
    Rule(_L + "self_attention.linear_proj.weight", (_M + "self_attn.o_proj.weight",)),
    Rule(_L + "pre_mlp_layernorm.weight", (_M + "post_attention_layernorm.weight",)),
    Rule(_L + "mlp.linear_fc1.weight", (_M + "mlp.gate_proj.weight", _M + "mlp.up_proj.weight"), "gate_up"),
    Rule(_L + "mlp.linear_fc2.weight", (_M + "mlp.down_proj.weight",)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
))
ARCHES: dict[str, Arch] = {arch.name: arch for arch in (GPT2, LLAMA)}
# The scalar head's bias has no place in HF's bias-free `score` layer: config.json keeps it.
SCORE_BIAS_KEY = "chatforge_score_bias"


def head_rules(model: ModelConfig) -> tuple[Rule, ...]:
    """The output layer: none when tied to the embedding; HF's lm_head or score otherwise."""
    if model.head == "scalar":
        return (Rule("output_layer.weight", ("score.weight",)),)
    if model.tie_embeddings:
        return ()
    return (Rule("output_layer.weight", ("lm_head.weight",), "vocab"),)


def expand(arch: Arch, model: ModelConfig) -> list[Rule]:
    """Every rule with `{i}` filled in for each layer, the head's included."""
    rules = []
    for rule in (*arch.body, *head_rules(model)):
        layers = range(model.num_layers) if "{i}" in rule.ours else (0,)
        rules += [Rule(rule.ours.format(i=i), tuple(t.format(i=i) for t in rule.theirs), rule.kind)
                  for i in layers]
    return rules


# ---- tensor layouts ---------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    heads: int
    groups: int
    head_dim: int

    @staticmethod
    def of(model: ModelConfig) -> "Shape":
        groups = model.num_query_groups or model.num_attention_heads
        return Shape(model.num_attention_heads, groups, model.hidden_size // model.num_attention_heads)


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: Shape) -> torch.Tensor:
    """[np hn, ...], [ng hn, ...], [ng hn, ...] -> Megatron's grouped [(np + 2 ng) hn, ...]."""
    rest = q.shape[1:]
    per = s.heads // s.groups
    parts = (q.reshape(s.groups, per * s.head_dim, *rest), k.reshape(s.groups, s.head_dim, *rest),
             v.reshape(s.groups, s.head_dim, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(fused: torch.Tensor, s: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of interleave_qkv."""
    rest = fused.shape[1:]
    per = s.heads // s.groups
    grouped = fused.reshape(s.groups, (per + 2) * s.head_dim, *rest)
    q, k, v = grouped.split([per * s.head_dim, s.head_dim, s.head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def grow_rows(rows: torch.Tensor, size: int) -> torch.Tensor:
    """`rows` [V, h] extended to [size, h]: rows beyond V (chat tokens added on import, the
    vocabulary padding) start at the mean row, so a new token's logit is the average
    logit (what transformers' resize_token_embeddings does with mean_resizing) and no
    padding column stands out in the softmax. Rows beyond `size` are dropped: an HF model
    may have more rows than its tokenizer has ids, and no token reaches them."""
    if rows.shape[0] >= size:
        return rows[:size].clone()
    mean = rows.float().mean(0, keepdim=True).to(rows.dtype)
    return torch.cat([rows, mean.expand(size - rows.shape[0], -1)])


def to_ours(rule: Rule, theirs: list[torch.Tensor], s: Shape, rows: int) -> torch.Tensor:
    """HF tensor(s) of `rule` -> the chatforge tensor (`rows`: the padded vocabulary)."""
    kinds: dict[str, Callable[[], torch.Tensor]] = {
        "copy": lambda: theirs[0],
        "t": lambda: theirs[0].t(),
        "qkv": lambda: interleave_qkv(*theirs, s),
        "qkv_fused": lambda: interleave_qkv(*theirs[0].chunk(3, dim=0), s),
        "qkv_fused_t": lambda: interleave_qkv(*theirs[0].t().chunk(3, dim=0), s),
        "gate_up": lambda: torch.cat(theirs, dim=0),
        "vocab": lambda: grow_rows(theirs[0], rows),
    }
    return kinds[rule.kind]().contiguous()


def to_theirs(rule: Rule, ours: torch.Tensor, s: Shape, vocab: int) -> list[torch.Tensor]:
    """The inverse of to_ours (`vocab`: the tokenizer's size; padding rows are cut)."""
    kinds: dict[str, Callable[[], list[torch.Tensor]]] = {
        "copy": lambda: [ours],
        "t": lambda: [ours.t()],
        "qkv": lambda: list(split_qkv(ours, s)),
        "qkv_fused": lambda: [torch.cat(split_qkv(ours, s), dim=0)],
        "qkv_fused_t": lambda: [torch.cat(split_qkv(ours, s), dim=0).t()],
        "gate_up": lambda: list(ours.chunk(2, dim=0)),
        "vocab": lambda: [ours[:vocab]],
    }
    return [t.contiguous() for t in kinds[rule.kind]()]


def convert_to_ours(arch: Arch, model: ModelConfig, theirs: Tensors, rows: int) -> Tensors:
    """A whole HF state dict -> chatforge tensors at TP1/PP1. KeyError naming a missing
    HF tensor; ValueError naming HF tensors no rule reads (a model this table misreads)."""
    s, ours, used = Shape.of(model), {}, set()
    for rule in expand(arch, model):
        missing = [name for name in rule.theirs if name not in theirs]
        if missing:
            raise KeyError(f"{arch.name}: the checkpoint has no {missing[0]} (needed for {rule.ours})")
        ours[rule.ours] = to_ours(rule, [theirs[name] for name in rule.theirs], s, rows)
        used.update(rule.theirs)
    # Tied models may still store lm_head; buffers such as GPT-2's attn.bias masks are not weights.
    ignorable = re.compile(r"(^lm_head\.weight$|\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$)")
    unread = sorted(name for name in theirs if name not in used and not ignorable.search(name))
    if unread:
        raise ValueError(f"{arch.name}: tensors this importer does not know: {unread[:5]}")
    return ours


def convert_to_theirs(arch: Arch, model: ModelConfig, ours: Tensors, vocab: int) -> Tensors:
    s, theirs = Shape.of(model), {}
    for rule in expand(arch, model):
        theirs.update(zip(rule.theirs, to_theirs(rule, ours[rule.ours], s, vocab)))
    return theirs


# ---- configs ------------------------------------------------------------------------------

def _rope_theta(hf: dict[str, Any]) -> float:
    """rope_theta from a config.json of transformers 4 (top level) or 5 (rope_parameters);
    scaled RoPE variants (Llama 3.1's "llama3", YaRN, ...) are refused."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or params.get("rope_type") or "default"
    if kind != "default":
        raise ValueError(f"config.json: rope type {kind!r} is not supported (plain RoPE only)")
    return float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _gpt2_model(hf: dict[str, Any]) -> dict[str, Any]:
    act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
    name = hf.get("activation_function", "gelu_new")
    if name not in act:
        raise ValueError(f"config.json: activation_function={name!r} is not supported ({sorted(act)})")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights", True) is False:
        raise ValueError("config.json: GPT-2 attention scaling variants are not supported")
    hidden = int(hf["n_embd"])
    return {"num_layers": int(hf["n_layer"]), "hidden_size": hidden,
            "num_attention_heads": int(hf["n_head"]), "ffn_hidden_size": int(hf.get("n_inner") or 4 * hidden),
            "seq_length": int(hf["n_positions"]), "position_embedding": "learned",
            "normalization": "LayerNorm", "activation": act[name],
            "tie_embeddings": bool(hf.get("tie_word_embeddings", True)), "add_bias": True,
            "layernorm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5))}


def _llama_model(hf: dict[str, Any]) -> dict[str, Any]:
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    groups = int(hf.get("num_key_value_heads") or heads)
    if hf.get("head_dim") not in (None, hidden // heads):
        raise ValueError(f"config.json: head_dim={hf['head_dim']} differs from hidden_size / heads")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("config.json: attention_bias / mlp_bias are not supported (Llama has none)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r}; Llama's SwiGLU needs silu")
    theta = _rope_theta(hf)
    if theta != int(theta):
        raise ValueError(f"config.json: rope_theta={theta} is not an integer (model.rotary_base is)")
    return {"num_layers": int(hf["num_hidden_layers"]), "hidden_size": hidden,
            "num_attention_heads": heads, "num_query_groups": None if groups == heads else groups,
            "ffn_hidden_size": int(hf["intermediate_size"]),
            "seq_length": int(hf.get("max_position_embeddings", 4096)), "position_embedding": "rope",
            "rotary_base": int(theta), "normalization": "RMSNorm", "activation": "swiglu",
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "add_bias": False,
            "layernorm_epsilon": float(hf.get("rms_norm_eps", 1e-6))}


def model_from_hf(hf: dict[str, Any]) -> tuple[Arch, dict[str, Any]]:
    """(architecture, ModelConfig fields) of an HF config.json."""
    kind = hf.get("model_type")
    readers = {"gpt2": _gpt2_model, "llama": _llama_model}
    if kind not in readers:
        raise ValueError(f"config.json: model_type={kind!r} is not supported ({', '.join(readers)})")
    fields = readers[kind](hf)
    fields["hidden_dropout"] = float(hf.get("resid_pdrop", 0.0) if kind == "gpt2" else 0.0)
    fields["attention_dropout"] = float(hf.get("attn_pdrop", hf.get("attention_dropout", 0.0)))
    return ARCHES[kind], fields


def _problems(model: ModelConfig, wanted: dict[str, Any]) -> list[str]:
    return [f"model.{key}={getattr(model, key)!r} (needs {value!r})"
            for key, value in wanted.items() if getattr(model, key) not in
            (value if isinstance(value, tuple) else (value,))]


def arch_of(model: ModelConfig) -> Arch:
    """The HF architecture that can hold this model, or ValueError saying why none can."""
    groups = (None, model.num_attention_heads)
    needs = {
        "gpt2": {"position_embedding": "learned", "normalization": "LayerNorm",
                 "activation": ("gelu", "gelu_tanh"), "add_bias": True, "num_query_groups": groups},
        "llama": {"position_embedding": "rope", "normalization": "RMSNorm", "activation": "swiglu",
                  "add_bias": False},
    }
    found = {name: _problems(model, wanted) for name, wanted in needs.items()}
    for name, problems in found.items():
        if not problems:
            return ARCHES[name]
    raise ValueError("no Hugging Face architecture fits this model: " + "; ".join(
        f"{name}: {', '.join(problems)}" for name, problems in found.items()))


def hf_config_kwargs(arch: Arch, model: ModelConfig, vocab: int, eod: int, pad: int,
                     score_bias: Optional[float]) -> dict[str, Any]:
    """Keyword arguments of the transformers config class that describes this model."""
    common: dict[str, Any] = {"vocab_size": vocab, "tie_word_embeddings": model.tie_embeddings,
                              # chatforge adds no BOS; GPT-2's convention names EOD for it
                              "bos_token_id": eod if arch is GPT2 else None,
                              "eos_token_id": eod, "pad_token_id": pad,
                              "architectures": [arch.score_class if score_bias is not None else arch.lm_class]}
    if score_bias is not None:
        common.update({"num_labels": 1, SCORE_BIAS_KEY: score_bias, "tie_word_embeddings": False})
    if arch is GPT2:
        return {**common, "n_positions": model.seq_length, "n_embd": model.hidden_size,
                "n_layer": model.num_layers, "n_head": model.num_attention_heads,
                "n_inner": ffn_size(model), "layer_norm_epsilon": model.layernorm_epsilon,
                "activation_function": "gelu_new" if model.activation == "gelu_tanh" else "gelu",
                "resid_pdrop": model.hidden_dropout, "embd_pdrop": model.hidden_dropout,
                "attn_pdrop": model.attention_dropout}
    return {**common, "hidden_size": model.hidden_size, "intermediate_size": ffn_size(model),
            "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_attention_heads,
            "num_key_value_heads": model.num_query_groups or model.num_attention_heads,
            "max_position_embeddings": model.seq_length, "rms_norm_eps": model.layernorm_epsilon,
            "rope_theta": float(model.rotary_base), "attention_dropout": model.attention_dropout,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
