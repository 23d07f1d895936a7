"""Stages: each differs only in data, step_fn, loss and the engines it holds.

STAGES maps a stage name (conf/stage/<name>.yaml) to the class that implements it; the
module is imported only when that stage runs, so this package stays torch-free."""
from __future__ import annotations

import importlib
from typing import Any

STAGES: dict[str, str] = {
    "pretrain": "trainer.stages.pretrain:PretrainStage",
}


def build_stage(ctx: Any) -> Any:
    name = ctx.cfg.stage.name
    if name not in STAGES:
        raise ValueError(f"stage.name={name!r}: unknown stage; known: {', '.join(sorted(STAGES))}")
    module_name, cls_name = STAGES[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(ctx)
