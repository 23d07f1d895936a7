"""The non-finite guard's pieces on one process: what counts as bad, how it is described,
and the loop's bookkeeping (consecutive bad steps, when to stop, the fault injection)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from chatforge_config.trainer import FaultConfig
from parallel.guard import NonFinite, check_world, local_grads_bad, local_loss_bad, poison
from trainer.guard import BadSteps


def test_non_finite_values_are_found_in_grads_and_loss() -> None:
    grads = [torch.ones(4), torch.zeros(0), torch.full((3,), 2.0)]
    assert not local_grads_bad(grads)
    for bad in (float("nan"), float("inf"), -float("inf")):
        grads[2][1] = bad
        assert local_grads_bad(grads)
        grads[2][1] = 2.0
    assert not local_grads_bad([])
    poison(grads)
    assert all(torch.isnan(g).all() for g in grads)
    stored = [{"loss": torch.tensor([3.0, 8.0])}, {"loss": torch.tensor([2.0, 8.0])}]
    assert not local_loss_bad(stored) and not local_loss_bad([])  # [] : not the last stage
    stored[1]["loss"][0] = float("inf")
    assert local_loss_bad(stored)


def test_one_process_check_names_this_rank() -> None:
    assert check_world(False, False) is None
    found = check_world(True, True)
    assert found == NonFinite({"loss": (0,), "grad_norm": (0,)})
    assert NonFinite({"grad_norm": (1,), "loss": (0, 3)}).describe() == "grad_norm on rank 1; loss on ranks 0,3"
    assert NonFinite({"grad_norm": (2, 5)}).first_rank == 2


@dataclass
class FakeEngine:
    trainable: bool = True
    skipped_updates: int = 0
    last_nonfinite: Optional[NonFinite] = None
    fault_nan_grad: bool = False


def test_bad_steps_count_streaks_and_stop_at_the_limit() -> None:
    engines = {"model": FakeEngine(), "reference": FakeEngine(trainable=False)}
    bad = BadSteps(2, FaultConfig(nan_grad_step=2, nan_grad_steps=2, nan_grad_rank=0), rank=0)
    armed = []
    for step in range(1, 6):
        bad.before(step, engines)
        armed.append(engines["model"].fault_nan_grad)
        assert not engines["reference"].fault_nan_grad
        if step in (2, 4, 5):  # the engine skipped an update in these steps
            engines["model"].skipped_updates += 1
            engines["model"].last_nonfinite = NonFinite({"grad_norm": (0,)})
        line = bad.after(step, engines)
        assert (line is not None) == (step in (2, 4, 5))
        assert bad.in_bad_streak == (step in (2, 4, 5))
        assert bad.exhausted == (step == 5)
    assert armed == [False, True, True, False, False]
    assert (bad.total, bad.consecutive) == (3, 2)
    assert line == ("[chatforge] step 5: non-finite grad_norm on rank 0; update skipped on every rank "
                    "(2 consecutive of train.max_bad_steps=2, 3 in this run)")
    assert "stopped at step 5" in bad.stop_message(5, "/runs/x/checkpoints/step_000003")
    assert "the last good checkpoint is /runs/x/checkpoints/step_000003" in bad.stop_message(5, "/runs/x/checkpoints/step_000003")


def test_the_fault_is_armed_on_its_rank_only() -> None:
    engines = {"model": FakeEngine()}
    BadSteps(3, FaultConfig(nan_grad_step=1, nan_grad_rank=1), rank=0).before(1, engines)
    assert not engines["model"].fault_nan_grad
    BadSteps(3, FaultConfig(nan_grad_step=1, nan_grad_rank=1), rank=1).before(1, engines)
    assert engines["model"].fault_nan_grad
    with pytest.raises(ValueError, match="train.max_bad_steps=0"):
        BadSteps(0, FaultConfig(), rank=0)
