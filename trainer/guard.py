"""The loop's side of the non-finite guard: which steps were skipped, and when to give up.

Each engine skips an update whose loss or gradients are non-finite on any rank
(parallel/guard.py) and counts it; a step is bad when any engine skipped an update in it
(PPO makes several updates per step). Every rank sees the same counts, so every rank makes the
same decision here without another collective. A run stops after train.max_bad_steps
consecutive bad steps (EXIT_NONFINITE) and writes no checkpoint at a bad step.
"""
from __future__ import annotations

from typing import Any, Optional

from chatforge_config.trainer import FaultConfig


class BadSteps:
    def __init__(self, max_bad_steps: int, fault: FaultConfig, rank: int) -> None:
        if max_bad_steps < 1:
            raise ValueError(f"train.max_bad_steps={max_bad_steps}: must be >= 1")
        self.max_bad_steps = max_bad_steps
        self.fault, self.rank = fault, rank
        self.total = 0  # bad steps in this run (the `skipped_steps` metric)
        self.consecutive = 0
        self.last: str = ""  # what the last bad step saw, e.g. "grad_norm on rank 1"
        self._counts: dict[str, int] = {}

    def _injecting(self, step: int) -> bool:
        first, count = int(self.fault.nan_grad_step), int(self.fault.nan_grad_steps)
        return first > 0 and first <= step < first + count and self.rank == int(self.fault.nan_grad_rank)

    def before(self, step: int, engines: dict[str, Any]) -> None:
        """Ahead of 1-based step `step`: arm the fault injection if it is due on this rank."""
        trained = [engine for engine in engines.values() if engine.trainable]
        self._counts = {name: engine.skipped_updates for name, engine in engines.items() if engine.trainable}
        for engine in trained:
            engine.fault_nan_grad = self._injecting(step)

    def after(self, step: int, engines: dict[str, Any]) -> Optional[str]:
        """After step `step`: None if every update was applied, else the line to log."""
        seen = [f"{engine.last_nonfinite.describe()}" + (f" ({name})" if len(self._counts) > 1 else "")
                for name, engine in engines.items()
                if engine.trainable and engine.skipped_updates > self._counts.get(name, 0)]
        for engine in engines.values():
            engine.fault_nan_grad = False
        if not seen:
            self.consecutive = 0
            return None
        self.total += 1
        self.consecutive += 1
        self.last = "; ".join(seen)
        return (f"[chatforge] step {step}: non-finite {self.last}; update skipped on every rank "
                f"({self.consecutive} consecutive of train.max_bad_steps={self.max_bad_steps}, "
                f"{self.total} in this run)")

    @property
    def in_bad_streak(self) -> bool:
        """No checkpoint is written now: the last step's update was skipped."""
        return self.consecutive > 0

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_bad_steps

    def stop_message(self, step: int, last_good: Optional[str]) -> str:
        where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
        return (f"[chatforge] error: stopped at step {step}: {self.consecutive} consecutive steps with "
                f"non-finite values (train.max_bad_steps={self.max_bad_steps}), the last: {self.last}. "
                f"Not saved; {where}. Lower optim.lr, raise warmup or check the data at this step.")
