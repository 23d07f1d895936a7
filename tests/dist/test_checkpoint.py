"""Checkpoints: exact resume, resharding to other layouts, stop signals, corruption.

The kill-during-save trials live in test_checkpoint_kill.py."""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import REPO, read_metrics, run_trainer, spawn_trainer, write_config

pytestmark = pytest.mark.dist

BASE: dict[str, Any] = {
    "logger": "none", "seed": 3,
    "model": {"num_layers": 2, "seq_length": 64},
    "train": {"steps": 10, "global_batch": 8, "micro_batch": 2, "eval_every": 0},
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "data": {"embedded": {"num_docs": 300}},
    "parallel": {"distributed_optimizer": True},
}


def _config(**sections: dict[str, Any]) -> dict[str, Any]:
    cfg = copy.deepcopy(BASE)
    for key, values in sections.items():
        cfg.setdefault(key, {}).update(values)
    return cfg


def _halves_and_straight(root: Path, layout: dict[str, Any], world: int) -> dict[str, Any]:
    """N steps straight, and N/2, stop, rerun the same command, N/2 (its checkpoint of
    step N/2 is what the reshard tests load)."""
    straight = run_trainer(root / "straight", _config(parallel=layout), world_size=world)
    halves = _config(parallel=layout, train={"exit_interval": 5})
    first = run_trainer(root / "halves", halves, world_size=world)
    resumed = run_trainer(root / "halves", halves, world_size=world)
    checkpoint = root / "halves" / "checkpoints" / "step_000005"
    assert (checkpoint / "manifest.json").is_file()
    return {"root": root, "straight": straight, "first": first, "resumed": resumed, "checkpoint": checkpoint}


def _assert_bitwise(run: dict[str, Any]) -> None:
    """The resumed run has exactly the straight run's bits."""
    straight, resumed = run["straight"], run["resumed"]
    assert [r["step"] for r in run["first"]] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in resumed] == list(range(1, 11))
    for a, b in zip(straight, resumed):
        assert (a["step"], a["loss"], a["grad_norm"], a["lr"]) == (b["step"], b["loss"], b["grad_norm"], b["lr"])
        # The same samples in the same order: the data position continues exactly.
        assert a["consumed_samples"] == b["consumed_samples"] == 8 * a["step"]
    log = (run["root"] / "halves" / "logs" / "rank_0.log").read_text()
    assert "continuing at step 5" in log
    first_attempt = log[:log.index("continuing at step 5")]
    assert "stopped at step 5 (saved; rerun the command to resume) by train.exit_interval=5" in first_attempt
    assert "done at step" not in first_attempt and "done at step 10" in log


@pytest.fixture(scope="module")
def tp2pp2_source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """TP2xPP2: 10 steps straight, and 5, stop, resume, 5 more (the reshard tests load its
    step-5 checkpoint and must reproduce steps 6-10)."""
    return _halves_and_straight(tmp_path_factory.mktemp("reshard"), {"tp": 2, "pp": 2}, 4)


def test_exact_resume_is_bitwise_tp2pp2(tp2pp2_source: dict[str, Any]) -> None:
    """N steps straight versus N/2, stop, rerun the same command, N/2: identical bits."""
    _assert_bitwise(tp2pp2_source)
    # Every rank hashed its own shards while writing them: a digest sidecar per shard file.
    shards = sorted((tp2pp2_source["checkpoint"] / "shards").glob("*.distcp"))
    assert len({p.name.split("_")[2] for p in shards}) == 4, [p.name for p in shards]
    assert all(p.with_name(p.name + ".xxh3").is_file() for p in shards)


def _logits(run_dir: Path, checkpoint: Path, parallel: dict[str, Any], world: int) -> torch.Tensor:
    from launcher.local import run_local

    path = write_config(run_dir, _config(parallel=parallel))
    out = run_dir / "logits.pt"
    code = run_local([sys.executable, "-m", "tests.dist.logits_worker", str(path), str(checkpoint), str(out)],
                     world, run_dir, env_extra={"PYTHONPATH": str(REPO)}, threads=1)
    assert code == 0, f"logits worker failed; see {run_dir}/logs"
    return torch.load(out)


@pytest.mark.parametrize("tp, pp", [(1, 1), (1, 2), (2, 1)], ids=["tp1pp1", "tp1pp2", "tp2pp1"])
def test_reshard_tp2pp2_checkpoint(tp2pp2_source: dict[str, Any], tp: int, pp: int) -> None:
    root, checkpoint = tp2pp2_source["root"], tp2pp2_source["checkpoint"]
    world = tp * pp
    name = f"tp{tp}pp{pp}"
    original = _logits(root / "logits_tp2pp2", checkpoint, {"tp": 2, "pp": 2}, 4) \
        if not (root / "logits_tp2pp2" / "logits.pt").exists() else torch.load(root / "logits_tp2pp2" / "logits.pt")
    here = _logits(root / f"logits_{name}", checkpoint, {"tp": tp, "pp": pp}, world)
    assert here.shape == original.shape
    torch.testing.assert_close(here, original, rtol=0, atol=1e-5)
    # Model and optimizer state at the new layout: the next steps track the original layout
    # (a wrong Adam moment or LR schedule shows from step 6 on).
    cfg = _config(parallel={"tp": tp, "pp": pp}, ckpt={"load": str(checkpoint), "load_state": "full"})
    records = run_trainer(root / f"cont_{name}", cfg, world_size=world)
    reference = [r for r in tp2pp2_source["resumed"] if r["step"] > 5]
    assert [r["step"] for r in records] == list(range(6, 11))
    for ours, ref in zip(records, reference):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-4), (name, ours["step"])


@pytest.fixture(scope="module")
def dp2_source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """DP2 with the distributed optimizer: 10 steps straight, and 5, stop, resume, 5 more."""
    return _halves_and_straight(tmp_path_factory.mktemp("dp2"), {"distributed_optimizer": True}, 2)


def test_exact_resume_dp2_is_bitwise_and_reshards_to_dp1(dp2_source: dict[str, Any], tmp_path: Path) -> None:
    """DP2: the resumed run has the straight run's bits, and its step-5 checkpoint loaded by
    one process continues the same way."""
    run = dp2_source
    _assert_bitwise(run)
    reference = [r for r in run["resumed"] if r["step"] > 5]
    load = {"load": str(run["checkpoint"]), "load_state": "full"}
    records = run_trainer(tmp_path / "dp1", _config(ckpt=load), world_size=1)
    assert [r["step"] for r in records] == list(range(6, 11))
    for ours, ref in zip(records, reference):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-4), ours["step"]
        assert ours["consumed_samples"] == ref["consumed_samples"]


@pytest.mark.parametrize("target", ["one_rank", "whole_group"])
def test_stop_signal_saves_same_step_on_all_ranks_and_resumes(tmp_path: Path, target: str) -> None:
    """SIGUSR1 to one rank only, or (as SLURM does) to every process of the job including
    helper processes: every rank stops at the same step boundary, the checkpoint holds that
    step, the exit code asks for a requeue, and rerunning continues."""
    run_dir = tmp_path / "run"
    cfg = _config(train={"steps": 400})
    path = write_config(run_dir, cfg)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    from launcher.local import free_port, rank_env

    port = free_port()
    procs: list[subprocess.Popen] = []
    # As under SLURM's srun (the job id tells the trainer a requeue follows a signal).
    slurm = {"SLURM_JOB_ID": "4242"} if target == "whole_group" else {}
    out = run_dir / "rank_0.out"
    for r in range(2):
        # One process group for all ranks (and their helpers), like a SLURM job step.
        group = 0 if r == 0 else procs[0].pid
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer", str(path)], cwd=REPO,
                                      env={**env, **rank_env(r, 2, port, 1, slurm)}, process_group=group,
                                      stdout=open(out, "wb") if r == 0 else subprocess.DEVNULL,
                                      stderr=subprocess.PIPE))
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    if target == "one_rank":
        procs[1].send_signal(signal.SIGUSR1)
    else:
        os.killpg(procs[0].pid, signal.SIGUSR1)
    codes = [p.wait(timeout=180) for p in procs]
    assert codes == [75, 75], [p.stderr.read().decode()[-2000:] for p in procs]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.split("_")[1])
    assert 3 <= stopped_at < 400
    assert read_metrics(run_dir)[-1]["step"] == stopped_at
    # The last line says what happened and what comes next, never "done".
    after = "requeued" if slurm else "rerun the command to resume"
    said = out.read_text()
    assert f"stopped at step {stopped_at} (saved; {after}) by a stop signal" in said and "done at" not in said
    rerun = _config(train={"steps": stopped_at + 2})
    records = run_trainer(run_dir, rerun, world_size=2)
    assert [r["step"] for r in records][-3:] == [stopped_at, stopped_at + 1, stopped_at + 2]
    assert f"done at step {stopped_at + 2}" in (run_dir / "logs" / "rank_0.log").read_text()


def test_time_limit_says_stopped_not_done(tmp_path: Path) -> None:
    """train.max_minutes: the run saves, exits 0 and its last line says it stopped and how to
    go on, never "done" (which only a run that reached train.steps says)."""
    run_dir = tmp_path / "run"
    code = spawn_trainer(run_dir, _config(train={"steps": 50, "max_minutes": 1e-6}))
    assert code == 0
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.split("_")[1])
    assert 1 <= stopped_at < 50 and not (run_dir / "done.json").exists()
    log = (run_dir / "logs" / "rank_0.log").read_text()
    assert (f"stopped at step {stopped_at} (saved; rerun the command to resume) by "
            f"train.max_minutes=1e-06") in log, log[-2000:]
    assert "done at step" not in log


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A single-process run with checkpoints at steps 4 and 8 (latest = step 8)."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    run_trainer(run_dir, _config(parallel={"distributed_optimizer": False},
                                 train={"steps": 8}, ckpt={"every": 4}))
    return run_dir


def _damaged_copy(saved_run: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(saved_run, target)
    return target


def _rerun(run_dir: Path, **ckpt: Any) -> tuple[int, str]:
    cfg = _config(parallel={"distributed_optimizer": False}, train={"steps": 10}, ckpt={"every": 4, **ckpt})
    code = spawn_trainer(run_dir, cfg, world_size=1)
    return code, (run_dir / "logs" / "rank_0.log").read_text()


def _shard(run_dir: Path, step: int) -> Path:
    return sorted((run_dir / "checkpoints" / f"step_{step:06d}" / "shards").glob("*.distcp"))[0]


def test_flipped_byte_stops_before_training(saved_run: Path, tmp_path: Path) -> None:
    run_dir = _damaged_copy(saved_run, tmp_path)
    shard = _shard(run_dir, 8)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    lines_before = len(read_metrics(run_dir))
    code, log = _rerun(run_dir)
    assert code == 2
    assert f"{shard}: checksum mismatch" in log
    assert len(read_metrics(run_dir)) == lines_before  # not one step was trained


def test_garbage_in_latest_names_the_file(saved_run: Path, tmp_path: Path) -> None:
    run_dir = _damaged_copy(saved_run, tmp_path)
    latest = run_dir / "checkpoints" / "latest"
    latest.write_text("\x00\x17garbage")
    code, log = _rerun(run_dir)
    assert code == 2
    assert f"{latest}: names" in log


def test_fallback_to_previous_complete_checkpoint(saved_run: Path, tmp_path: Path) -> None:
    run_dir = _damaged_copy(saved_run, tmp_path)
    _shard(run_dir, 8).unlink()  # the newest checkpoint lost a shard
    code, log = _rerun(run_dir, fallback=True)
    assert code == 0, log[-3000:]
    assert "falling back to" in log and "continuing at step 4" in log
    assert [r["step"] for r in read_metrics(run_dir)][-6:] == [5, 6, 7, 8, 9, 10]


def test_missing_ckpt_load_is_an_error_not_random_init(tmp_path: Path) -> None:
    cfg = _config(ckpt={"load": str(tmp_path / "nowhere")})
    code = spawn_trainer(tmp_path / "run", cfg, world_size=1)
    log = (tmp_path / "run" / "logs" / "rank_0.log").read_text()
    assert code == 2 and "does not exist" in log and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_async_save_commits_the_same_checkpoints(dp2_source: dict[str, Any], tmp_path: Path) -> None:
    """Async saves write in the background and commit later; the run ends only after the
    last commit, and resuming from an async checkpoint is as exact as from a sync one (the
    same DP2 run straight, from dp2_source)."""
    from trainer.checkpoint_files import verify

    cfg = _config(train={"exit_interval": 6}, ckpt={"every": 2, "keep": 10, "async_save": True})
    run_trainer(tmp_path / "async", cfg, world_size=2)
    root = tmp_path / "async" / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000002", "step_000004", "step_000006"]
    assert (root / "latest").read_text().strip() == "step_000006"
    assert all(verify(p) == [] for p in root.glob("step_*"))
    # Each rank's async writer hashed its shards while writing them (a sidecar per shard).
    shards = sorted(p.name for p in (root / "step_000006" / "shards").glob("*.distcp"))
    assert shards and all((root / "step_000006" / "shards" / (name + ".xxh3")).is_file() for name in shards)
    resumed = run_trainer(tmp_path / "async", cfg, world_size=2)
    assert [r["step"] for r in resumed] == list(range(1, 11))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in dp2_source["straight"]]


def test_sync_save_writes_in_process_hashes_while_writing_and_retires_in_background(tmp_path: Path) -> None:
    """tests/dist/save_worker.py: a synchronous save forks nothing (os.fork raises), every
    shard's digest comes from its sidecar and matches the file, ckpt.keep=1 retires older
    checkpoints at once and deletes them by close(), and a stale .trash_ goes at start."""
    found = subprocess.run([sys.executable, "-m", "tests.dist.save_worker", str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert found.returncode == 0 and "OK" in found.stdout, found.stdout[-2000:] + found.stderr[-4000:]
