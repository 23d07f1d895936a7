"""The one training loop, shared by every stage: steps, evaluation, logging, checkpoints,
resume and stop requests."""
from __future__ import annotations

import os
import time
from typing import Any

from trainer.checkpointing import Checkpointer
from trainer.exitcodes import EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE
from trainer.faults import crash_drill
from trainer.guard import BadSteps
from trainer.heartbeat import Heartbeat
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


def _stop_reason(cfg: Any, stops: StopRequests, done: int, total: int) -> tuple[str, bool]:
    """Why the run stops after step `done` ("" to go on) and whether a stop signal asked."""
    signalled, out_of_time = stops.agree()
    interval = int(cfg.train.exit_interval)
    if signalled:
        return "a stop signal", True
    if out_of_time:
        return f"train.max_minutes={cfg.train.max_minutes}", False
    if interval > 0 and done % interval == 0 and done < total:
        return f"train.exit_interval={interval}", False
    return "", False


def _stopped_line(done: int, why: str, code: int, saved: bool) -> str:
    """The last line of a run stopped before train.steps: what happened and what comes next.
    Under SLURM the task wrapper requeues a signalled job (launcher/slurm_task.py)."""
    after = ("requeued" if code == EXIT_REQUEUE and os.environ.get("SLURM_JOB_ID")
             else "rerun the command to resume")
    what = "saved" if saved else "not saved, its update was skipped: the last good checkpoint resumes"
    return f"[chatforge] stopped at step {done} ({what}; {after}) by {why}"


def _train(ctx: RunContext, stage: Stage, checkpointer: Checkpointer, start: int) -> int:
    cfg = ctx.cfg
    total, every = int(cfg.train.steps), int(cfg.ckpt.every)
    logger = MetricsLogger(ctx.run_dir, enabled=ctx.is_main, logger=str(cfg.logger),
                           wandb_cfg=cfg.wandb, config=config_dict(cfg), total_steps=total,
                           start_step=start)
    stops = StopRequests(float(cfg.train.max_minutes))
    stops.install()
    bad = BadSteps(int(cfg.train.max_bad_steps), cfg.train.fault, ctx.env.rank)
    # Beats start after the first step, not before: building the model and the first step
    # may take long, and the watchdog's clock starts at the job's first heartbeat.
    heart = Heartbeat(ctx.run_dir, ctx.env.rank)
    code, done, why = EXIT_OK, start, ""
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
            bad.before(step + 1, stage.engines())
            result = stage.train_step(step)
            seconds = time.perf_counter() - t0
            done = step + 1
            skipped_now = bad.after(done, stage.engines())
            heart.beat(done)
            crash_drill(cfg.train.fault, done, ctx.env.rank, heart, ctx.run_dir)
            if skipped_now:
                logger.message(skipped_now)
            record = _record(done, result, seconds, stage.tokens_per_step, time.perf_counter() - started)
            record["skipped_steps"] = bad.total
            if _should_eval(done, total, int(cfg.train.eval_every)):
                heart.beat(done, "eval", force=True)  # so a stall names what it was doing
                record.update(stage.evaluate())
            if (done % max(int(cfg.train.log_every), 1) == 0 or done == total or "eval_loss" in record
                    or skipped_now):
                logger.log({**record, **sizes}, steps_done_this_run=done - start)
                sizes = {}
            checkpointer.poll()
            if bad.exhausted:
                checkpointer.close()  # saves in flight are of good steps: let them finish
                latest = checkpointer.latest()
                logger.message(bad.stop_message(done, str(latest) if latest else None))
                return EXIT_NONFINITE
            why, signalled = _stop_reason(cfg, stops, done, total)
            if why:
                logger.message(f"[chatforge] {why}: saving step {done} and stopping")
                code = EXIT_REQUEUE if signalled else EXIT_OK
                break
            if every > 0 and done % every == 0 and done < total and not bad.in_bad_streak:
                heart.beat(done, "save", force=True)
                checkpointer.save(done, stage.engines(), stage.state_dict())
        # Clean end, signal or time limit: the last step is saved unless its update was
        # skipped (then the newest checkpoint is that of the last good step).
        if not bad.in_bad_streak:
            checkpointer.save(done, stage.engines(), stage.state_dict())
        checkpointer.close()
        if done >= total:
            mark_done(ctx, stage.name, done)
            logger.message(f"[chatforge] done at step {done}: {ctx.run_dir / 'metrics.jsonl'}")
        else:
            logger.message(_stopped_line(done, why, code, saved=not bad.in_bad_streak))
    finally:
        heart.beat(done, "exit", force=True)  # leaving the loop: no longer watched
        stops.uninstall()
        logger.close()
    return code
