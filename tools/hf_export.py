"""Export a chatforge checkpoint as a Hugging Face model directory.

    python -m tools.hf_export SRC OUT_DIR [--dtype float32|bfloat16|float16]

SRC: a run dir, its checkpoints/ dir or one step_NNNNNN dir, of any stage: pretrain, SFT,
DPO, rejection sampling, PPO/A2C (the policy), a reward model. The checkpoint is loaded in
this one process at TP1/PP1 (the sharded format reloads at any layout; LoRA adapters are
merged on load) and OUT_DIR gets:

    config.json, generation_config.json   GPT2* or Llama* by the model's shape (tools/hf_common.py)
    model.safetensors                     the tokenizer's vocabulary (chatforge's padding cut)
    tokenizer.model | tokenizer.json      the run's tokenizer, chat pieces included
    tokenizer_config.json                 EOD as eos, pad, and the chat template the model was
                                          trained with (ChatML, or an imported model's own)

A language model becomes *ForCausalLM. A scalar-head model (a reward model) becomes
*ForSequenceClassification with num_labels=1: its `score` is chatforge's value head without
the bias, which config.json keeps as `chatforge_score_bias`; transformers scores the last
non-pad token, so score + chatforge_score_bias is chatforge's reward of a prompt + response
row (rm.reduce=last: the value at the response's last token). docs/huggingface.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from tools.hf_common import Arch, Tensors, arch_of, convert_to_theirs, hf_config_kwargs
from trainer.data.chat_template import TEMPLATE_FILES
from trainer.data.tokenizer import (CHAT_PIECES, IM_END, SentencePieceTokenizer, Tokenizer,
                                    canonical_name)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# ChatML as chatforge renders it (trainer/data/chat.py), with the generation prompt.
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
                 "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def export_config(step_dir: Path) -> Any:
    """The checkpoint's config, set to load in this one process (TP1/PP1, fp32)."""
    from chatforge_config.parallel import ParallelConfig
    from trainer import runtime

    cfg = runtime.load_config(step_dir / "config.yaml")
    cfg.parallel = ParallelConfig()
    cfg.cluster.nodes, cfg.cluster.procs_per_node = 1, 1
    return cfg


def load_merged_weights(ctx: Any, cfg: Any, step_dir: Path, vocab: int) -> Any:
    """The checkpoint's model as a plain engine (no adapters) at TP1/PP1: the one place of
    the export where a LoRA checkpoint's adapters are merged into the base weights.
    trainer.checkpointing.load_weights does that merge itself (trainer/lora_checkpoint.py:
    it loads the base the adapters were trained on, then folds W + (alpha/r) B A into it),
    so the state read here is always whole weights; the check below keeps it so."""
    from parallel.engine import Engine
    from trainer.checkpointing import load_weights

    engine = Engine(cfg.model, cfg.parallel, ctx.topo, vocab_size=vocab, seed=int(cfg.seed))
    load_weights(step_dir, {"model": engine}, cfg.model)
    left = [name for name, _ in engine.module.named_parameters() if name.endswith((".lora_a", ".lora_b"))]
    if left:
        raise RuntimeError(f"{step_dir}: LoRA adapters left unmerged: {left[:3]}")
    return engine


def read_state(step_dir: Path) -> tuple[Any, Tensors, Path]:
    """(config, chatforge tensors at TP1/PP1, tokenizer file) of a checkpoint."""
    from trainer import runtime
    from trainer.data.tokenizer import tokenizer_of

    cfg = export_config(step_dir)
    tok_path = tokenizer_of(step_dir)
    ctx = runtime.start(cfg)
    try:
        engine = load_merged_weights(ctx, cfg, step_dir, Tokenizer(tok_path).vocab_size)
        state = {name: t.detach().to("cpu", copy=True) for name, t in engine.module.state_dict().items()
                 if isinstance(t, torch.Tensor)}
    finally:
        runtime.close(ctx)
    return cfg, state, tok_path


def write_model(out_dir: Path, arch: Arch, cfg: Any, state: Tensors, tok: Tokenizer, dtype: torch.dtype) -> None:
    import transformers
    from safetensors.torch import save_file

    model = cfg.model
    scalar = str(model.head) == "scalar"
    bias = float(state["output_layer.bias"].reshape(-1)[0]) if scalar else None
    tensors = convert_to_theirs(arch, model, state, tok.vocab_size)
    save_file({name: t.to(dtype).contiguous() for name, t in tensors.items()},
              str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config_class = getattr(transformers, "GPT2Config" if arch.name == "gpt2" else "LlamaConfig")
    kwargs = hf_config_kwargs(arch, model, tok.vocab_size, tok.eod_id, tok.pad_id, bias)
    config_class(**kwargs).save_pretrained(out_dir)
    if not scalar:
        chat = tok.chat_template is not None or tok.chat_id(IM_END) is not None
        stops = [tok.eod_id] + ([tok.end_of_turn_id] if chat and tok.end_of_turn_id != tok.eod_id else [])
        transformers.GenerationConfig(eos_token_id=stops, pad_token_id=tok.pad_id,
                                      bos_token_id=kwargs["bos_token_id"]).save_pretrained(out_dir)


def write_tokenizer(out_dir: Path, tok_path: Path, tok: Tokenizer, seq_length: int) -> None:
    """The tokenizer file as it is, and a tokenizer_config.json that names its roles."""
    shutil.copyfile(tok_path, out_dir / canonical_name(tok_path))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tok.id_to_piece(tok.eod_id), "pad_token": tok.id_to_piece(tok.pad_id),
        "bos_token": None, "add_bos_token": False, "add_eos_token": False,
        "model_max_length": seq_length, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    template = tok.chat_template  # an imported model's own: the one it was trained with
    for stale in TEMPLATE_FILES[1:]:  # only tokenizer_config.json holds the template here
        (out_dir / stale).unlink(missing_ok=True)
    if template is not None:
        config["chat_template"] = template.config.template
        if template.config.bos_token:
            config["bos_token"] = template.config.bos_token
    if isinstance(tok, SentencePieceTokenizer):
        config.update({"tokenizer_class": "LlamaTokenizer", "unk_token": tok.id_to_piece(tok.unk_id),
                       "legacy": False, "add_prefix_space": False})
    chat = [piece for piece in CHAT_PIECES if tok.chat_id(piece) is not None]
    if chat:
        config["additional_special_tokens"] = chat
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def export_hf(source: Path, out_dir: Path, dtype: str = "float32") -> Path:
    """Checkpoint SRC -> Hugging Face directory OUT_DIR (module docstring); returns OUT_DIR."""
    from trainer.checkpoint_files import resolve_load_path

    step_dir = resolve_load_path(source)
    cfg, state, tok_path = read_state(step_dir)
    arch = arch_of(cfg.model)
    tok = Tokenizer(tok_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_model(out_dir, arch, cfg, state, tok, DTYPES[dtype])
    write_tokenizer(out_dir, tok_path, tok, int(cfg.model.seq_length))
    kind = arch.score_class if str(cfg.model.head) == "scalar" else arch.lm_class
    print(f"[hf_export] {step_dir} -> {out_dir}: {kind}, vocabulary {tok.vocab_size}, {dtype}", flush=True)
    return out_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    from trainer.checkpointing import CheckpointError

    parser = argparse.ArgumentParser(prog="python -m tools.hf_export", description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="a run dir, its checkpoints/ dir or a step_NNNNNN dir")
    parser.add_argument("out_dir", type=Path, help="the Hugging Face directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="weights' dtype in model.safetensors (default float32, as trained)")
    args = parser.parse_args(argv)
    try:
        export_hf(args.source, args.out_dir, args.dtype)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"hf_export: error: {exc}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
