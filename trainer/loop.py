"""The one training loop, shared by every stage."""
from __future__ import annotations

import time
from typing import Any

from trainer.metrics import MetricsLogger
from trainer.runtime import RunContext, config_dict
from trainer.stages.base import Stage


def _should_eval(step: int, total: int, every: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def _record(step: int, result: Any, seconds: float, tokens: int, elapsed: float) -> dict[str, Any]:
    record: dict[str, Any] = {"step": step}
    record.update(result.metrics)
    record.update({
        "lr": result.lr,
        "grad_norm": result.grad_norm,
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "step_time_s": seconds,
        "elapsed": elapsed,
    })
    if result.skipped:
        record["skipped"] = True
    return record


def run(ctx: RunContext, stage: Stage, start_step: int = 0) -> list[dict[str, Any]]:
    """Train `stage` from `start_step` to train.steps; log, evaluate, stop on time limit.
    Returns the records logged (on every rank; rank 0 also writes them)."""
    cfg = ctx.cfg
    total = int(cfg.train.steps)
    logger = MetricsLogger(ctx.run_dir, enabled=ctx.is_main, logger=str(cfg.logger),
                           wandb_cfg=cfg.wandb, config=config_dict(cfg), total_steps=total,
                           start_step=start_step)
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    deadline = started + 60.0 * float(cfg.train.max_minutes) if cfg.train.max_minutes > 0 else None
    logger.message(f"[chatforge] stage={stage.name} steps {start_step}->{total} "
                   f"layout tp={ctx.topo.tp} pp={ctx.topo.pp} dp={ctx.topo.dp} run.dir={ctx.run_dir}")
    try:
        if start_step == 0 and int(cfg.train.eval_every) > 0:
            # The untrained baseline: every eval curve starts at step 0.
            baseline = {"step": 0, **stage.evaluate()}
            records.append(baseline)
            logger.log(baseline, steps_done_this_run=0)
        for step in range(start_step, total):
            t0 = time.perf_counter()
            result = stage.train_step(step)
            seconds = time.perf_counter() - t0
            done = step + 1
            record = _record(done, result, seconds, stage.tokens_per_step, time.perf_counter() - started)
            if _should_eval(done, total, int(cfg.train.eval_every)):
                record.update(stage.evaluate())
            records.append(record)
            if done % max(int(cfg.train.log_every), 1) == 0 or done == total or "eval_loss" in record:
                logger.log(record, steps_done_this_run=done - start_step)
            if deadline is not None:
                # Ranks' clocks differ: every rank asks every step, rank 0's answer counts.
                if _agree_stop(ctx, time.perf_counter() > deadline):
                    logger.message(f"[chatforge] train.max_minutes={cfg.train.max_minutes} reached at step {done}")
                    break
        logger.message(f"[chatforge] done: {ctx.run_dir / 'metrics.jsonl'}")
    finally:
        logger.close()
    return records


def _agree_stop(ctx: RunContext, mine: bool) -> bool:
    """All ranks must leave the loop at the same step: take rank 0's decision."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if mine else 0.0])
    if dist.get_world_size() > 1:
        if torch.cuda.is_available():
            flag = flag.cuda()
        dist.broadcast(flag, src=0)
    return bool(flag.item() > 0)
