"""Run the real training loop and record, on this rank, whether each step changed the
parameters and the optimizer state: `python -m tests.dist.guard_worker CONFIG OUT_DIR`.
Writes OUT_DIR/rank_N.json; run with the launcher's local spawner, one process per rank."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch


def _optimizer_tensors(optimizer: Any) -> list[torch.Tensor]:
    """Every tensor of the optimizer state (Adam's moments and step) on this rank."""
    tensors: list[torch.Tensor] = []
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if inner is None:
            continue
        for state in inner.state.values():
            tensors += [v.detach().clone() for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def _snapshot(stage: Any) -> dict[str, list[torch.Tensor]]:
    engine = stage.engines()["model"]
    return {"params": [p.detach().clone() for p in engine.model[0].parameters()],
            "optim": _optimizer_tensors(engine.optimizer),
            "schedule": [torch.tensor(float(engine.scheduler.num_steps))]}


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def main(config_path: str, out: str) -> int:
    from trainer import runtime
    from trainer.loop import run
    from trainer.stages import build_stage

    cfg = runtime.load_config(config_path)
    ctx = runtime.start(cfg)
    stage = build_stage(ctx)
    unchanged: dict[int, dict[str, bool]] = {}
    train_step = stage.train_step

    def watched(step: int) -> Any:
        before = _snapshot(stage)
        result = train_step(step)
        after = _snapshot(stage)
        unchanged[step + 1] = {k: _same(before[k], after[k]) for k in before}
        unchanged[step + 1]["finite"] = all(bool(torch.isfinite(p).all()) for p in after["params"])
        return result

    stage.train_step = watched  # type: ignore[method-assign]
    try:
        code = run(ctx, stage)
    finally:
        runtime.close(ctx)
    Path(out, f"rank_{ctx.env.rank}.json").write_text(json.dumps({"code": code, "steps": unchanged}))
    return code


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
