"""Checkpoints of LoRA runs hold only what trains (adapters, a scalar head); `lora.json` in
the step dir names, per engine, the checkpoint its frozen base came from. Loading such a
checkpoint rebuilds the base first (recursively: a base may itself be a LoRA run), then
either continues the adapters (resume) or folds them into the weights (every other load:
the next stage, a reference, a reward model, chat, export). docs/lora.md."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from parallel.dist import gather_lists, rank_and_world
from trainer.checkpoint_files import CheckpointError, verify

LORA_FILE = "lora.json"


def lora_records(step_dir: Path) -> dict[str, Any]:
    """What a LoRA run's checkpoint says of each engine it saved as adapters only: engine
    name -> {"lora": {rank, alpha, dropout, targets}, "base": {"dir", "source", "keep_init"}},
    the base being the checkpoint (and the engine name in it) its frozen weights came from.
    Empty for a checkpoint that holds whole models."""
    path = step_dir / LORA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def lora_records_of(engines: dict[str, Any]) -> dict[str, Any]:
    records = {}
    for name, engine in engines.items():
        if getattr(engine, "lora", None) is None:
            continue
        if engine.lora_base is None:
            raise CheckpointError(f"engine {name!r} trains LoRA adapters on weights that no checkpoint "
                                  "holds: lora.rank > 0 needs ckpt.load (the base model)")
        lora = engine.lora
        lora = OmegaConf.to_container(lora) if OmegaConf.is_config(lora) else dict(vars(lora))
        records[name] = {"lora": lora, "base": engine.lora_base}
    return records


def require_lora_bases(engines: dict[str, Any]) -> None:
    """Before training: every LoRA engine has its base (else its checkpoints could not be
    loaded: they hold only the adapters)."""
    lora_records_of(engines)


def _same_adapters(engine: Any, saved: dict[str, Any]) -> bool:
    mine = engine.lora
    return mine is not None and int(mine.rank) == int(saved["rank"]) and \
        str(mine.targets) == str(saved["targets"]) and float(mine.alpha) == float(saved["alpha"])


def load_checkpoint(engines: dict[str, Any], directory: Path, with_optimizer: bool,
                    sources: Optional[dict[str, str]] = None, keep_init: tuple[str, ...] = ()) -> None:
    """Load the checkpoint in step dir `directory` into `engines` at this run's layout;
    collective. `sources` and `keep_init` as parallel.checkpoint.load_engines. An engine that
    a LoRA run saved holds only its adapters (and a trained scalar head): its base is loaded
    first, from the checkpoint its lora.json names (recursively: a base may be a LoRA run too),
    then the adapters: they stay adapters where this engine continues them (a full-state
    load: resume), else they are folded into the weights (merge on load). A LoRA engine that
    loads weights only keeps its own adapters at their init and records the base."""
    from chatforge_config.parallel import LoRAConfig
    from parallel.checkpoint import load_engines, merge_saved_adapters

    sources = sources or {}
    records = lora_records(directory)
    whole = {name: e for name, e in engines.items() if sources.get(name, name) not in records}
    if whole:
        if with_optimizer and any(e.lora is not None for e in whole.values()):
            raise CheckpointError(f"{directory}: holds whole-model training state; with lora.rank > 0 "
                                  "load its weights (ckpt.load_state=weights)")
        load_engines(whole, directory / "shards", with_optimizer, sources, keep_init)
    for name, engine in engines.items():
        source = sources.get(name, name)
        base = {"dir": str(directory), "source": source, "keep_init": list(keep_init)}
        if name in whole:
            engine.lora_base = base if engine.lora is not None else None
            continue
        record = records[source]
        base_dir = Path(record["base"]["dir"])
        problems = gather_lists(verify(base_dir, *rank_and_world())) if base_dir.is_dir() else [f"{base_dir}: does not exist"]
        if problems:
            raise CheckpointError(f"{directory / LORA_FILE}: the base of {source!r} cannot be loaded: {problems[0]}")
        if with_optimizer and not _same_adapters(engine, record["lora"]):
            raise CheckpointError(f"{directory}: {source!r} holds LoRA adapters {record['lora']}; continue "
                                  "them with the same lora.* or load the merged weights (ckpt.load_state=weights)")
        inherited = tuple(dict.fromkeys([*record["base"]["keep_init"], *keep_init]))
        load_checkpoint({name: engine}, base_dir, False, {name: record["base"]["source"]}, inherited)
        if with_optimizer:
            load_engines({name: engine}, directory / "shards", True, {name: source})
            engine.lora_base = record["base"]
        else:
            merge_saved_adapters(engine, directory / "shards", source, LoRAConfig(**record["lora"]), keep_init)
            engine.lora_base = base if engine.lora is not None else None
