"""The watchdog's rules on a fake clock: the clock starts at the job's first heartbeat, beats
left by an earlier attempt do not count, a rank that beat "exit" or whose process is gone is
not watched, the likeliest culprit is named, and 0 disables it."""
from __future__ import annotations

from pathlib import Path

from launcher.watchdog import Watchdog
from trainer.heartbeat import Heartbeat, heartbeat_path, read_beat


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _beat(run_dir: Path, rank: int, step: int, phase: str = "step") -> None:
    Heartbeat(run_dir, rank, min_interval_s=0).beat(step, phase)


def test_clock_starts_at_first_heartbeat_and_old_beats_do_not_count(tmp_path: Path) -> None:
    _beat(tmp_path, 1, 7)  # left by an earlier attempt
    clock = Clock()
    dog = Watchdog(tmp_path, 2, timeout_s=10, clock=clock, read_every_s=0)
    clock.now += 1000  # a slow start (model build, first step) is no hang
    assert dog.poll() is None
    _beat(tmp_path, 0, 1)
    assert dog.poll() is None and dog.started == clock.now
    clock.now += 11  # rank 1 never beat in this attempt, rank 0 stopped beating
    stall = dog.poll()
    assert stall is not None and stall.rank == 1 and stall.beat is None and stall.others == (0,)
    assert "rank 1 (no heartbeat yet): no progress for 11 s (train.hang_timeout=10)" in stall.message(10)


def test_culprit_is_the_stopped_then_the_lowest_step(tmp_path: Path) -> None:
    clock = Clock()
    dog = Watchdog(tmp_path, 3, timeout_s=5, clock=clock, read_every_s=0)
    _beat(tmp_path, 0, 4)
    _beat(tmp_path, 1, 3)
    _beat(tmp_path, 2, 4)
    assert dog.poll() is None
    clock.now += 6
    stall = dog.poll()
    assert stall is not None and stall.rank == 1 and stall.others == (0, 2)
    assert stall.message(5).startswith("watchdog: rank 1 on ")
    assert "last step 3" in stall.message(5) and "likely waiting for it" in stall.message(5)
    stall = dog.poll(state=lambda rank: "T" if rank == 2 else "S")
    assert stall is not None and stall.rank == 2 and "(its process is stopped)" in stall.message(5)


def test_exited_and_gone_ranks_are_not_watched(tmp_path: Path) -> None:
    clock = Clock()
    dog = Watchdog(tmp_path, 2, timeout_s=5, clock=clock, read_every_s=0)
    _beat(tmp_path, 0, 9, "exit")
    _beat(tmp_path, 1, 9)
    assert dog.poll() is None
    clock.now += 6
    assert dog.poll(gone=[1]) is None
    assert dog.poll().rank == 1  # type: ignore[union-attr]
    clock.now += 1.5
    _beat(tmp_path, 1, 10)  # progress resets its clock
    assert dog.poll() is None


def test_zero_disables_and_beats_carry_host_step_memory(tmp_path: Path) -> None:
    clock = Clock()
    dog = Watchdog(tmp_path, 1, timeout_s=0, clock=clock, read_every_s=0)
    _beat(tmp_path, 0, 2, "save")
    clock.now += 1e6
    assert not dog.enabled and dog.poll() is None
    beat = read_beat(heartbeat_path(tmp_path, 0))
    assert beat is not None and beat.step == 2 and beat.host and beat.max_rss_mb and beat.max_rss_mb > 1
    assert "last step 2 then saving, memory high-water mark" in beat.where()
