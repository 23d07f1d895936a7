"""The one training loop, shared by every stage: steps, evaluation, logging, checkpoints,
resume and stop requests."""
from __future__ import annotations

import time
from typing import Any

from trainer.checkpointing import Checkpointer
from trainer.exitcodes import EXIT_OK, EXIT_REQUEUE
from trainer.lora_checkpoint import require_lora_bases
from trainer.metrics import MetricsLogger
from trainer.runtime import RunContext, config_dict, mark_done
from trainer.signals import StopRequests
from trainer.stages.base import Stage


def _should_eval(step: int, total: int, every: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def _record(step: int, result: Any, seconds: float, tokens: int, elapsed: float) -> dict[str, Any]:
    record: dict[str, Any] = {"step": step}
    record.update(result.metrics)
    record.update(result.extra)
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


def _resume(ctx: RunContext, stage: Stage, checkpointer: Checkpointer) -> int:
    resume = checkpointer.find_resume()
    if resume is None:
        return 0
    start = checkpointer.load(resume, stage.engines(), stage)
    if ctx.is_main:
        what = "full state" if resume.full_state else "weights only"
        print(f"[chatforge] loaded {resume.directory} ({what}); continuing at step {start}", flush=True)
    return start


def _parameter_counts(stage: Stage) -> dict[str, int]:
    """Parameters of the engines the stage trains, and those of them the optimizer updates
    (all, or with LoRA the adapters and a scalar head); collective."""
    trained = [engine for engine in stage.engines().values() if engine.trainable]
    return {"trainable_params": sum(e.parameter_count(trainable_only=True) for e in trained),
            "total_params": sum(e.parameter_count() for e in trained)}


def run(ctx: RunContext, stage: Stage) -> int:
    """Train `stage` to train.steps, resuming from this run's latest checkpoint (or
    ckpt.load). Returns the process exit code: EXIT_REQUEUE after a stop signal."""
    checkpointer = Checkpointer(ctx)
    try:
        start = _resume(ctx, stage, checkpointer)
        require_lora_bases(stage.engines())
        return _train(ctx, stage, checkpointer, start)
    finally:
        checkpointer.close(clean=False)  # no-op after a clean run (already closed)


def _train(ctx: RunContext, stage: Stage, checkpointer: Checkpointer, start: int) -> int:
    cfg = ctx.cfg
    total, every = int(cfg.train.steps), int(cfg.ckpt.every)
    logger = MetricsLogger(ctx.run_dir, enabled=ctx.is_main, logger=str(cfg.logger),
                           wandb_cfg=cfg.wandb, config=config_dict(cfg), total_steps=total,
                           start_step=start)
    stops = StopRequests(float(cfg.train.max_minutes))
    stops.install()
    code, done = EXIT_OK, start
    started = time.perf_counter()
    sizes = _parameter_counts(stage)  # reported once: in this line and the first record
    share = sizes["trainable_params"] / max(sizes["total_params"], 1)
    logger.message(f"[chatforge] stage={stage.name} steps {start}->{total} "
                   f"layout tp={ctx.topo.tp} pp={ctx.topo.pp} dp={ctx.topo.dp} run.dir={ctx.run_dir} "
                   f"params {sizes['trainable_params']:,} trainable of {sizes['total_params']:,} ({share:.2%})")
    try:
        if start == 0 and int(cfg.train.eval_every) > 0:
            # The untrained baseline: every eval curve starts at step 0.
            logger.log({"step": 0, **sizes, **stage.evaluate()}, steps_done_this_run=0)
            sizes = {}
        for step in range(start, total):
            t0 = time.perf_counter()
            result = stage.train_step(step)
            seconds = time.perf_counter() - t0
            done = step + 1
            record = _record(done, result, seconds, stage.tokens_per_step, time.perf_counter() - started)
            if _should_eval(done, total, int(cfg.train.eval_every)):
                record.update(stage.evaluate())
            if done % max(int(cfg.train.log_every), 1) == 0 or done == total or "eval_loss" in record:
                logger.log({**record, **sizes}, steps_done_this_run=done - start)
                sizes = {}
            checkpointer.poll()
            signalled, out_of_time = stops.agree()
            interval = int(cfg.train.exit_interval)
            at_interval = interval > 0 and done % interval == 0 and done < total
            if signalled or out_of_time or at_interval:
                why = ("a stop signal" if signalled else f"train.max_minutes={cfg.train.max_minutes}"
                       if out_of_time else f"train.exit_interval={interval}")
                logger.message(f"[chatforge] {why}: saving step {done} and stopping")
                code = EXIT_REQUEUE if signalled else EXIT_OK
                break
            if every > 0 and done % every == 0 and done < total:
                checkpointer.save(done, stage.engines(), stage.state_dict())
        # Clean end, signal or time limit: the last step is always saved.
        checkpointer.save(done, stage.engines(), stage.state_dict())
        checkpointer.close()
        if done >= total:
            mark_done(ctx, stage.name, done)
        logger.message(f"[chatforge] done at step {done}: {ctx.run_dir / 'metrics.jsonl'}")
    finally:
        stops.uninstall()
        logger.close()
    return code
