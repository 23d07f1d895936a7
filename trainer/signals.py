"""Stop requests: SIGTERM/SIGUSR1 (preemption, SLURM's warning before the time limit) and
train.max_minutes. Handlers only set a flag; the loop asks all ranks at each step boundary
and they stop together, so every rank saves the same step."""
from __future__ import annotations

import signal
import time
from typing import Any, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals() -> None:
    """For helper processes (megatron's checkpoint-writer Manager): SLURM signals every
    process of a job step, and a helper that died of the stop signal would break the very
    save that signal asks for. This module stays torch-free so that a spawned helper that
    runs this imports little."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopRequests:
    def __init__(self, max_minutes: float) -> None:
        self.signum: Optional[int] = None
        self.deadline = time.monotonic() + 60.0 * max_minutes if max_minutes > 0 else None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        # Only a flag: saving from inside a handler would race the collective in flight.
        self.signum = signum

    def agree(self) -> tuple[bool, bool]:
        """(signalled, out_of_time) as agreed by all ranks: any rank's request stops all."""
        import torch
        import torch.distributed as dist

        local = torch.tensor([1.0 if self.signum is not None else 0.0,
                              1.0 if self.deadline is not None and time.monotonic() > self.deadline else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            if torch.cuda.is_available():
                local = local.cuda()
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
        return bool(local[0].item() > 0), bool(local[1].item() > 0)
