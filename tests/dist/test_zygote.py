"""launcher/zygote.py: trainer ranks forked from a pre-imported zygote (the session's, from
tests/conftest.py) behave as ranks started by exec: the same losses, exit codes, signals, and
they stop when their launcher dies."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from launcher.zygote import ENV
from tests.conftest import REPO, read_metrics, spawn_trainer, write_config

pytestmark = pytest.mark.dist

TINY: dict[str, Any] = {
    "logger": "none", "seed": 5,
    "model": {"num_layers": 1, "seq_length": 32},
    "train": {"steps": 4, "global_batch": 4, "micro_batch": 2, "eval_every": 0},
    "data": {"embedded": {"num_docs": 50}},
}


@pytest.fixture
def zygote(trainer_zygote: Any) -> str:
    if not trainer_zygote:
        pytest.fail("the session's trainer zygote did not start (see the warning at the start of the run)")
    return str(trainer_zygote)


def test_forked_ranks_train_as_exec_started_ones(zygote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    forked = spawn_trainer(tmp_path / "forked", TINY, world_size=2)
    monkeypatch.delenv(ENV)  # the exec path: `python -m trainer` per rank
    execed = spawn_trainer(tmp_path / "execed", TINY, world_size=2)
    assert forked == execed == 0
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / "forked")] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / "execed")]
    assert "done at step 4" in (tmp_path / "forked" / "logs" / "rank_0.log").read_text()


def test_exit_code_and_signal_reach_the_launcher(zygote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.zygote import ZygoteRank, ZygoteRefused

    # A trainer that fails (ckpt.load names nothing): its exit code (2) comes back.
    assert spawn_trainer(tmp_path / "bad", {**TINY, "ckpt": {"load": str(tmp_path / "none")}}) == 2
    path = write_config(tmp_path / "long", {**TINY, "train": {**TINY["train"], "steps": 100000}})
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29611", "PYTHONPATH": str(REPO)}
    with open(tmp_path / "long.log", "wb") as log:
        rank = ZygoteRank(zygote, [sys.executable, "-m", "trainer", str(path)], env, stdout=log, stderr=None,
                          merge_stderr=True)
    assert rank.poll() is None and os.getpgid(rank.pid) == rank.pid  # running, in a session of its own
    os.killpg(rank.pid, signal.SIGKILL)
    assert rank.wait(timeout=30) == -signal.SIGKILL
    # A PYTHONPATH whose `trainer` is another package (a test's stand-in) is refused: the
    # launcher then starts that rank by exec.
    shadow = tmp_path / "shadow" / "trainer"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)  # as `python -m trainer` puts the working directory first on sys.path
    with pytest.raises(ZygoteRefused, match="would be"):
        ZygoteRank(zygote, [sys.executable, "-m", "trainer", str(path)], {**env, "PYTHONPATH": str(shadow.parent)},
                   stdout=None, stderr=None)


def test_ranks_stop_when_their_launcher_dies(zygote: str, tmp_path: Path) -> None:
    """The kernel's parent-death signal cannot reach a forked rank (the zygote is its parent):
    it watches the launcher instead (every 0.5 s) and stops as on that signal."""
    run_dir = tmp_path / "orphan"
    overrides = tmp_path / "orphan.json"
    overrides.write_text(json.dumps({**TINY, "train": {**TINY["train"], "steps": 100000}}))
    script = ("import json, sys; from pathlib import Path; from tests.conftest import spawn_trainer; "
              f"sys.exit(spawn_trainer(Path({str(run_dir)!r}), json.loads(Path({str(overrides)!r}).read_text()), 2))")
    launcher = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    beats = run_dir / "logs" / "heartbeat"
    deadline = time.monotonic() + 120
    pids: list[int] = []
    while time.monotonic() < deadline and len(pids) < 2:
        pids = [json.loads(p.read_text())["pid"] for p in beats.glob("rank_*.json")] if beats.is_dir() else []
        time.sleep(0.2)
    assert len(pids) == 2, "the ranks did not start"
    launcher.kill()
    launcher.wait()
    # A stop signal: the ranks agree on a step, save a checkpoint and exit (a minute at most
    # on a busy machine), as ranks started by exec do on their parent-death signal.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids), f"ranks outlived their launcher: {[_state(pid) for pid in pids]}"
    # Nor did anything they started (each rank leads its own session): the Manager server of
    # the checkpoint writer is stopped by the rank's exit handlers, as in a rank started by exec.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (left := _in_sessions(pids)):
        time.sleep(0.2)
    assert not left, f"processes of the ranks' sessions outlived them: {[_state(p) for p in left]}"


def _in_sessions(sessions: list[int]) -> list[int]:
    """Live processes whose session id is one of `sessions`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _alive(int(entry.name)):
            try:
                fields = (entry / "stat").read_text().split(")")[-1].split()
            except OSError:
                continue
            if int(fields[3]) in sessions:  # after the command: state ppid pgrp session
                found.append(int(entry.name))
    return found


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read()[:120]
    except FileNotFoundError:
        return "gone"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_local_recipe_starts_and_stops_its_own_zygote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """launcher.zygote.started (what `chatforge recipe=...` runs its local steps in): names a
    zygote in CHATFORGE_ZYGOTE meanwhile, which comes up and takes ranks, and is gone after."""
    from launcher.zygote import started

    monkeypatch.delenv(ENV, raising=False)
    with started(tmp_path / "logs" / "zygote.log") as sock:
        assert os.environ[ENV] == sock
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not os.path.exists(sock):
            time.sleep(0.2)
        assert os.path.exists(sock), (tmp_path / "logs" / "zygote.log").read_text()[-2000:]
        assert spawn_trainer(tmp_path / "run", TINY) == 0
        zygotes = [p for p in _children() if sock in p]
        assert zygotes, "the zygote is not running"
    assert ENV not in os.environ and not os.path.exists(sock)
    assert not [p for p in _children() if sock in p], "the zygote outlived its recipe"


def _children() -> list[str]:
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            found.append(" ".join(proc.cmdline()))
        except psutil.NoSuchProcess:
            pass
    return found
