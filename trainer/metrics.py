"""Where metrics go: <run.dir>/metrics.jsonl, wandb, and a progress line. Rank 0 only."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def progress_line(record: dict[str, Any], total_steps: int, eta_s: float) -> str:
    """`step 10/100 | loss 5.1234 | lr 3.00e-04 | 12,345 tok/s | 0:00:12 | ETA 0:01:48`"""
    parts = [f"step {record['step']}/{total_steps}"]
    for key in ("loss", "eval_loss", "reward", "kl", "eval_reward"):
        if key in record:
            parts.append(f"{key} {record[key]:.4f}")
    if "lr" in record:
        parts.append(f"lr {record['lr']:.2e}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    parts.append(format_duration(record.get("elapsed", 0.0)))
    parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


def wandb_mode(configured: str, environ: Optional[dict[str, str]] = None) -> str:
    """Offline unless the user set an account up (API key in the environment or a netrc
    entry from `wandb login`) or asked for a mode explicitly."""
    if configured in ("online", "offline", "disabled"):
        return configured
    env = os.environ if environ is None else environ
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    if env.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(env.get("HOME", "~")).expanduser() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class MetricsLogger:
    """Appends one JSON object per logged step to metrics.jsonl (line-buffered, so a crash
    keeps every line written before it) and mirrors it to wandb."""

    def __init__(self, run_dir: Path, enabled: bool, logger: str, wandb_cfg: Any,
                 config: dict[str, Any], total_steps: int, start_step: int = 0,
                 stream: TextIO = sys.stdout) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream
        self.start = time.perf_counter()
        self._file: Optional[TextIO] = None
        self._wandb: Any = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        _keep_steps_up_to(path, start_step)
        self._file = open(path, "a", buffering=1)
        if logger == "wandb":
            import wandb  # imported only when used: it starts a service process

            self._wandb = wandb.init(
                project=wandb_cfg.project, entity=wandb_cfg.entity, dir=str(run_dir),
                mode=wandb_mode(wandb_cfg.mode), config=config, name=run_dir.name,
                resume="allow", id=_wandb_id(run_dir),
            )

    def log(self, record: dict[str, Any], steps_done_this_run: int) -> None:
        if not self.enabled:
            return
        assert self._file is not None
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        elapsed = time.perf_counter() - self.start
        per_step = elapsed / steps_done_this_run if steps_done_this_run else float("nan")
        eta = per_step * (self.total_steps - record["step"])
        print(progress_line({**record, "elapsed": elapsed}, self.total_steps, eta),
              file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _keep_steps_up_to(path: Path, last_step: int) -> None:
    """A run restarted at `last_step` (from scratch: 0, resumed: the checkpoint's step) will
    log the later steps again; drop their old lines so each step appears once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step and last_step > 0:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a killed run
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _wandb_id(run_dir: Path) -> str:
    """A stable id per run dir, so a resumed run continues the same wandb run."""
    id_file = run_dir / "wandb_id.txt"
    if id_file.exists():
        return id_file.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return run_id
