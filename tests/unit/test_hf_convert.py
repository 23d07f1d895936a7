"""The HF <-> chatforge tables and layouts (tools/hf_common.py), the config translation in
both directions, and an imported model's Hydra option (tools/hf_import.py). The forward
equivalence with transformers is tests/dist/test_hf.py."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from chatforge_config.parallel import ModelConfig
from launcher.cli import preflight
from tools.hf_common import (GPT2, LLAMA, Rule, Shape, arch_of, convert_to_ours, convert_to_theirs, expand,
                             grow_rows, hf_config_kwargs, interleave_qkv, model_from_hf, split_qkv, to_ours,
                             to_theirs)
from tools.hf_import import run_config, write_configs

GPT2_JSON: dict[str, Any] = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 64,
                             "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                             "vocab_size": 300}
LLAMA_JSON: dict[str, Any] = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
                              "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "vocab_size": 300,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}


def test_qkv_grouped_layout() -> None:
    """4 query heads in 2 KV groups, head_dim 1: per group its 2 queries, its key, its value."""
    s = Shape(heads=4, groups=2, head_dim=1)
    q, k, v = torch.arange(4.0)[:, None], 10 + torch.arange(2.0)[:, None], 20 + torch.arange(2.0)[:, None]
    fused = interleave_qkv(q, k, v, s)
    assert fused[:, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, s), (q, k, v)))


@pytest.mark.parametrize("kind,shapes", [
    ("copy", [(6, 4)]), ("t", [(4, 6)]), ("qkv", [(8, 4), (4, 4), (4, 4)]), ("qkv_fused", [(12,)]),
    ("qkv_fused_t", [(4, 12)]), ("gate_up", [(6, 4), (6, 4)]), ("vocab", [(5, 4)]),
])
def test_every_layout_inverts(kind: str, shapes: list[tuple[int, ...]]) -> None:
    s = Shape(heads=4, groups=2 if kind == "qkv" else 4, head_dim=2 if kind == "qkv" else 1)
    theirs = [torch.randn(shape) for shape in shapes]
    ours = to_ours(Rule("x", ("y",) * len(shapes), kind), theirs, s, rows=8)
    back = to_theirs(Rule("x", ("y",) * len(shapes), kind), ours, s, vocab=5)
    assert all(torch.equal(a, b) for a, b in zip(back, theirs)) and len(back) == len(theirs)


def test_grow_rows_uses_the_mean_and_cuts_extra_rows() -> None:
    rows = torch.randn(5, 3)
    grown = grow_rows(rows, 8)
    assert torch.equal(grown[:5], rows) and torch.allclose(grown[5:], rows.mean(0).expand(3, -1))
    assert torch.equal(grow_rows(rows, 4), rows[:4])


def test_gpt2_and_llama_configs_read() -> None:
    arch, fields = model_from_hf(GPT2_JSON)
    assert arch is GPT2
    assert fields | {"ffn_hidden_size": 256, "activation": "gelu_tanh", "tie_embeddings": True,
                     "position_embedding": "learned", "seq_length": 64, "add_bias": True} == fields
    arch, fields = model_from_hf(LLAMA_JSON)
    assert arch is LLAMA
    assert (fields["num_query_groups"], fields["rotary_base"], fields["layernorm_epsilon"],
            fields["tie_embeddings"], fields["activation"]) == (2, 500000, 1e-6, False, "swiglu")
    assert model_from_hf({**LLAMA_JSON, "num_key_value_heads": 4})[1]["num_query_groups"] is None
    assert model_from_hf({**LLAMA_JSON, "rope_parameters": None, "rope_theta": 10000.0})[1]["rotary_base"] == 10000


@pytest.mark.parametrize("change,message", [
    ({"model_type": "mistral"}, "model_type='mistral'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope type 'llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear'"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_unsupported_configs_are_named(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        model_from_hf({**LLAMA_JSON, **change})


def test_unsupported_gpt2_activation() -> None:
    with pytest.raises(ValueError, match="activation_function='relu'"):
        model_from_hf({**GPT2_JSON, "activation_function": "relu"})


@pytest.mark.parametrize("source", [GPT2_JSON, LLAMA_JSON])
def test_config_round_trip_through_transformers(source: dict[str, Any]) -> None:
    """config.json -> ModelConfig -> the transformers config export writes -> the same."""
    import transformers

    arch, fields = model_from_hf(source)
    model = ModelConfig(**fields)
    kwargs = hf_config_kwargs(arch, model, vocab=300, eod=2, pad=0, score_bias=None)
    written = getattr(transformers, "GPT2Config" if arch is GPT2 else "LlamaConfig")(**kwargs).to_dict()
    assert written["architectures"] == [arch.lm_class]
    assert model_from_hf(written) == (arch, fields)


def test_arch_of_names_what_does_not_fit() -> None:
    assert arch_of(ModelConfig()) is GPT2  # chatforge's default: learned, LayerNorm, gelu, biases
    assert arch_of(ModelConfig(**model_from_hf(LLAMA_JSON)[1])) is LLAMA
    with pytest.raises(ValueError, match=r"gpt2: model.position_embedding='rope'.*llama: model.normalization"):
        arch_of(ModelConfig(position_embedding="rope"))


def test_tables_cover_the_state_both_ways() -> None:
    arch, fields = model_from_hf(LLAMA_JSON)
    model = ModelConfig(**fields)
    names = [name for rule in expand(arch, model) for name in rule.theirs]
    assert len(names) == len(set(names)) == 1 + 9 * 2 + 1 + 1  # embed, 9 per layer, norm, lm_head
    s = Shape.of(model)
    shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
              "gate_proj": (96, 64), "up_proj": (96, 64), "down_proj": (64, 96)}
    theirs = {n: torch.randn(next((v for k, v in shapes.items() if k in n), (300, 64) if "embed" in n or "lm_head" in n
                                  else (64,))) for n in names}
    ours = convert_to_ours(arch, model, theirs, rows=384)
    assert ours["decoder.layers.1.self_attention.linear_qkv.weight"].shape == ((4 + 2 * 2) * s.head_dim, 64)
    assert ours["output_layer.weight"].shape == (384, 64)
    back = convert_to_theirs(arch, model, ours, vocab=300)
    assert sorted(back) == sorted(theirs) and all(torch.equal(back[n], theirs[n]) for n in theirs)
    with pytest.raises(ValueError, match="does not know.*extra.weight"):
        convert_to_ours(arch, model, {**theirs, "model.extra.weight": torch.zeros(1)}, rows=384)
    with pytest.raises(KeyError, match="no model.norm.weight"):
        convert_to_ours(arch, model, {n: t for n, t in theirs.items() if n != "model.norm.weight"}, rows=384)


def test_imported_model_is_a_hydra_option(tmp_path: Path) -> None:
    """`chatforge --config-dir <import>/conf model=<name> ...` composes the imported shape,
    and the launcher accepts gelu_tanh (GPT-2's activation)."""
    _, fields = model_from_hf(GPT2_JSON)
    write_configs(run_config(fields, "hf_tiny", tmp_path), tmp_path)
    points, errors = preflight(["model=hf_tiny", "stage=sft", f"ckpt.load={tmp_path}", f"run.dir={tmp_path}/sft"],
                               multirun=False, config_dir=str(tmp_path / "conf"))
    assert errors == []
    model = points[0].cfg.model
    assert {key: model[key] for key in fields} == fields and model.name == "hf_tiny"
    _, errors = preflight(["model.activation=relu"], multirun=False)
    assert len(errors) == 1 and "model.activation=relu" in errors[0] and "gelu_tanh" in errors[0]


def test_command_line_errors_name_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tools import hf_export, hf_import

    assert hf_import.main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "nope/config.json: missing" in capsys.readouterr().out
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "bert"}')
    assert hf_import.main([str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    assert "model_type='bert' is not supported" in capsys.readouterr().out
    assert hf_export.main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().out
