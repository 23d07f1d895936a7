"""The non-finite guard in several processes: NaN injected into one rank's gradients at step
k (train.fault.*) is skipped by every rank, logged with its step and rank, and enough
consecutive bad steps stop the run with EXIT_NONFINITE, the last good checkpoint intact."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, read_metrics, spawn_trainer, write_config
from trainer.exitcodes import EXIT_NONFINITE

pytestmark = pytest.mark.dist

BASE: dict[str, Any] = {
    "logger": "none", "seed": 5,
    "model": {"num_layers": 2, "seq_length": 32},
    "train": {"steps": 5, "global_batch": 4, "micro_batch": 2, "eval_every": 0},
    "optim": {"lr": 3e-3, "warmup_steps": 0},
    "data": {"embedded": {"num_docs": 200}},
}


def _config(**sections: dict[str, Any]) -> dict[str, Any]:
    cfg = copy.deepcopy(BASE)
    for key, values in sections.items():
        cfg.setdefault(key, {}).update(values)
    return cfg


@pytest.mark.parametrize("parallel", [{"distributed_optimizer": True}, {"tp": 2}], ids=["dp2", "tp2"])
def test_nan_at_step_k_is_skipped_on_every_rank(tmp_path: Path, parallel: dict[str, Any]) -> None:
    from launcher.local import run_local

    k, bad_rank = 3, 1
    path = write_config(tmp_path, _config(parallel=parallel, train={
        "fault": {"nan_grad_step": k, "nan_grad_rank": bad_rank}}))
    code = run_local([sys.executable, "-m", "tests.dist.guard_worker", str(path), str(tmp_path)], 2,
                     tmp_path, env_extra={"PYTHONPATH": str(REPO)}, threads=1)
    assert code == 0, f"see {tmp_path}/logs"
    for rank in (0, 1):
        steps = json.loads((tmp_path / f"rank_{rank}.json").read_text())["steps"]
        assert sorted(int(s) for s in steps) == [1, 2, 3, 4, 5]
        for step, seen in steps.items():
            skipped = int(step) == k
            # Step k changes nothing (parameters, Adam moments and step, LR schedule); every
            # other step changes all three; nothing is ever non-finite.
            assert seen == {"params": skipped, "optim": skipped, "schedule": skipped, "finite": True}, (rank, step)
    records = {r["step"]: r for r in read_metrics(tmp_path)}
    assert records[k]["skipped"] is True and records[k]["skipped_steps"] == 1
    assert records[k - 1]["skipped_steps"] == 0 and records[5]["skipped_steps"] == 1
    assert all(r["loss"] == r["loss"] for r in records.values())  # NaN only reached the grads
    log = (tmp_path / "logs" / "rank_0.log").read_text()
    assert f"step {k}: non-finite grad_norm on rank {bad_rank}; update skipped on every rank" in log
    assert "done at step 5" in log


def test_max_bad_steps_stops_with_the_last_good_checkpoint(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    faulty = _config(train={"steps": 8, "max_bad_steps": 2,
                            "fault": {"nan_grad_step": 4, "nan_grad_steps": 10, "nan_grad_rank": 1}},
                     ckpt={"every": 1, "keep": 10})
    assert spawn_trainer(tmp_path, faulty, world_size=2) == EXIT_NONFINITE
    assert "stopped by the non-finite guard" in capsys.readouterr().err  # the launcher's line
    log = (tmp_path / "logs" / "rank_0.log").read_text()
    assert "error: stopped at step 5: 2 consecutive steps with non-finite values" in log
    assert "the last: grad_norm on rank 1" in log
    checkpoints = tmp_path / "checkpoints"
    # Steps 4 and 5 were skipped: no checkpoint of them, and `latest` names step 3.
    assert sorted(p.name for p in checkpoints.glob("step_*")) == [f"step_00000{i}" for i in (1, 2, 3)]
    assert (checkpoints / "latest").read_text().strip().endswith("step_000003")
    assert not (tmp_path / "done.json").exists()
    assert [r["step"] for r in read_metrics(tmp_path)][-2:] == [4, 5]
    # The same command without the fault resumes from step 3 and finishes.
    healthy = _config(train={"steps": 8, "max_bad_steps": 2}, ckpt={"every": 1, "keep": 10})
    assert spawn_trainer(tmp_path, healthy, world_size=2) == 0
    log = (tmp_path / "logs" / "rank_0.log").read_text()
    assert "continuing at step 3" in log and "done at step 8" in log
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 9))
