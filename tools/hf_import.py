"""Import a Hugging Face model directory as a chatforge run directory.

    python -m tools.hf_import HF_DIR OUT_DIR [--name NAME] [--seq-length N]

HF_DIR is what transformers' save_pretrained writes: config.json, model.safetensors (or
sharded with model.safetensors.index.json) and the tokenizer: tokenizer.model
(sentencepiece, Llama style) or tokenizer.json (GPT-2 style). GPT-2 and Llama architectures
(tools/hf_common.py). OUT_DIR becomes a run directory every stage accepts as ckpt.load:

    OUT_DIR/config.yaml                 the resolved chatforge config (model.* from config.json)
    OUT_DIR/conf/model/NAME.yaml        the same model.* as a Hydra option (--config-dir OUT_DIR/conf)
    OUT_DIR/tokenizer/tokenizer.{model,json}   the tokenizer: as it is when HF_DIR's
                                        tokenizer_config.json has a chat_template (kept beside
                                        it, and used by every stage), else with the ChatML
                                        chat pieces appended if missing
    OUT_DIR/checkpoints/step_000000/    the weights in the trainer's sharded format (any TP/PP)
    OUT_DIR/checkpoints/latest

Embedding rows: the tokenizer's new chat pieces and the vocabulary padding start at the
mean embedding row (untied output rows likewise; tools/hf_common.grow_rows).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from chatforge_config.parallel import ModelConfig
from tools.hf_common import Arch, Tensors, convert_to_ours, model_from_hf
from trainer.data.chat_template import read_template_config
from trainer.data.tokenizer import HF_FILE, SPM_FILE, Tokenizer, add_chat_pieces, canonical_name, copy_tokenizer


def read_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not a Hugging Face model directory)")
    return dict(json.loads(path.read_text()))


def read_tensors(hf_dir: Path) -> Tensors:
    """Every tensor of model.safetensors or of the shards its index names."""
    from safetensors.torch import load_file

    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        tensors: Tensors = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            tensors.update(load_file(str(hf_dir / shard)))
        return tensors
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors (or .index.json); save the model with "
                            "transformers' save_pretrained (safetensors is its default)")


def _normalise_names(arch: Arch, tensors: Tensors) -> Tensors:
    """Bare GPT-2 checkpoints (the hub's `gpt2`) name the body without `transformer.`."""
    if arch.name == "gpt2" and "wte.weight" in tensors:
        return {(name if name.startswith("lm_head.") else arch.prefix + name): t for name, t in tensors.items()}
    return tensors


def import_tokenizer(hf_dir: Path, hf: dict[str, Any], out_dir: Path) -> tuple[Path, list[str]]:
    """Copy the tokenizer into out_dir (tokenizer.model if HF_DIR has one, else
    tokenizer.json) with the chat pieces appended; returns (its path, pieces added)."""
    source = next((hf_dir / name for name in (SPM_FILE, HF_FILE) if (hf_dir / name).is_file()), None)
    if source is None:
        raise FileNotFoundError(f"{hf_dir}: no {SPM_FILE} or {HF_FILE} (save a fast tokenizer, "
                                "or the sentencepiece model, beside the weights)")
    dest = out_dir / "tokenizer" / canonical_name(source)
    if read_template_config(source) is not None:
        # The model's own chat template: every stage formats conversations with it
        # (trainer/data/chat_template.py), so no ChatML pieces are added.
        copy_tokenizer(source, dest.parent)
        added: list[str] = []
    else:
        added = add_chat_pieces(source, dest)
    eos = hf.get("eos_token_id")
    tok = Tokenizer(dest)
    if isinstance(eos, int) and eos != tok.eod_id:
        print(f"[hf_import] note: config.json eos_token_id={eos}, chatforge's end-of-document is "
              f"{tok.id_to_piece(tok.eod_id)!r} (id {tok.eod_id})", flush=True)
    return dest, added


def model_name(hf_dir: Path) -> str:
    return "hf_" + re.sub(r"[^A-Za-z0-9_]+", "_", hf_dir.resolve().name).strip("_").lower()


def run_config(fields: dict[str, Any], name: str, out_dir: Path) -> Any:
    """The resolved chatforge config of the imported run (schema defaults + model.*)."""
    from chatforge_config.trainer import Config

    cfg = OmegaConf.structured(Config)
    cfg.model = OmegaConf.merge(OmegaConf.structured(ModelConfig), {**fields, "name": name})
    cfg.run.dir = str(out_dir.resolve())
    cfg.logger = "none"
    cfg.cluster.procs_per_node = 1
    return cfg


def write_configs(cfg: Any, out_dir: Path) -> None:
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    option = out_dir / "conf" / "model" / f"{cfg.model.name}.yaml"
    option.parent.mkdir(parents=True, exist_ok=True)
    option.write_text(f"# Imported by tools/hf_import.py; use with --config-dir {out_dir / 'conf'} "
                      f"model={cfg.model.name}\n" + OmegaConf.to_yaml(cfg.model))


def write_checkpoint(cfg: Any, arch: Arch, tensors: Tensors, tok_path: Path) -> Path:
    """Build the model at TP1/PP1 in this process, fill it, save it as the trainer would."""
    import torch

    from parallel.engine import Engine
    from parallel.model import padded_vocab_size
    from trainer import runtime
    from trainer.checkpointing import Checkpointer

    ctx = runtime.start(cfg)
    try:
        ctx.tokenizer_path = tok_path
        vocab = Tokenizer(tok_path).vocab_size
        rows = padded_vocab_size(vocab, cfg.model, cfg.parallel)
        ours = convert_to_ours(arch, cfg.model, tensors, rows)
        engine = Engine(cfg.model, cfg.parallel, ctx.topo, vocab_size=vocab, seed=int(cfg.seed))
        with torch.no_grad():
            for name, param in engine.module.named_parameters():
                if name not in ours:
                    raise KeyError(f"{arch.name}: nothing in the table fills {name}")
                value = ours.pop(name)
                if tuple(value.shape) != tuple(param.shape):
                    raise ValueError(f"{name}: {tuple(value.shape)} from the checkpoint, "
                                     f"the model has {tuple(param.shape)}")
                param.copy_(value)
        if ours:
            raise ValueError(f"{arch.name}: no parameter takes {sorted(ours)[:5]}")
        checkpointer = Checkpointer(ctx)
        checkpointer.save(0, {"model": engine}, stage_state={})
        checkpointer.close()
        return ctx.run_dir / "checkpoints"
    finally:
        runtime.close(ctx)


def import_hf(hf_dir: Path, out_dir: Path, name: Optional[str] = None,
              seq_length: Optional[int] = None) -> Path:
    """HF_DIR -> a chatforge run directory OUT_DIR (module docstring); returns OUT_DIR."""
    hf = read_config(hf_dir)
    arch, fields = model_from_hf(hf)
    if seq_length is not None:
        if fields["position_embedding"] == "learned" and seq_length != fields["seq_length"]:
            raise ValueError(f"--seq-length={seq_length}: learned positions fix it to "
                             f"{fields['seq_length']} (the position table's rows)")
        fields["seq_length"] = seq_length
    if (out_dir / "checkpoints").exists():
        raise FileExistsError(f"{out_dir}: already holds checkpoints; import into a new directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = _normalise_names(arch, read_tensors(hf_dir))
    tok_path, added = import_tokenizer(hf_dir, hf, out_dir)
    cfg = run_config(fields, name or model_name(hf_dir), out_dir)
    write_configs(cfg, out_dir)
    write_checkpoint(cfg, arch, tensors, tok_path)
    vocab = Tokenizer(tok_path).vocab_size
    print(f"[hf_import] {hf_dir} ({arch.name}) -> {out_dir}: model={cfg.model.name}, vocabulary "
          f"{vocab}" + (f" (added {', '.join(added)})" if added else ""), flush=True)
    print(f"[hf_import] fine-tune it: chatforge --config-dir {out_dir / 'conf'} model={cfg.model.name} "
          f"stage=sft ckpt.load={out_dir} run.dir=runs/sft", flush=True)
    return out_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.hf_import", description=__doc__.split("\n")[0])
    parser.add_argument("hf_dir", type=Path, help="a Hugging Face model directory (config.json, safetensors)")
    parser.add_argument("out_dir", type=Path, help="the chatforge run directory to create")
    parser.add_argument("--name", help="model.name (and the Hydra option's name); default hf_<dir name>")
    parser.add_argument("--seq-length", type=int, help="model.seq_length (RoPE models; default: "
                        "max_position_embeddings)")
    args = parser.parse_args(argv)
    try:
        import_hf(args.hf_dir, args.out_dir, args.name, args.seq_length)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as exc:
        print(f"hf_import: error: {exc}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
