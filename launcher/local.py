"""Run one job as local processes, one per rank, with torchrun's environment contract.

Pure subprocess on purpose: the launcher never imports torch. Each rank runs in its own
session (process group) so that Ctrl-C in the terminal reaches only the launcher, which then
decides how to stop every rank, grandchildren included (data loader workers share the
rank's group). On Linux the ranks also die with the launcher (PR_SET_PDEATHSIG) so a killed
launcher never leaves ranks blocked in a collective forever.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Optional

from launcher.failures import clear_failure, death_line, log_tail, record_failure
from launcher.watchdog import Stall, Watchdog, process_state
from launcher.zygote import ENV as ZYGOTE_ENV
from launcher.zygote import ZygoteRank, is_trainer_command, parent_death_signal
from trainer.exitcodes import EXIT_HANG, EXIT_REQUEUE  # torch-free

GRACE_S = 5.0  # between the polite signal and SIGKILL
POLL_S = 0.05


def free_port() -> int:
    """A TCP port that was free a moment ago (the usual race is acceptable on one machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rank_env(rank: int, world_size: int, port: int, threads: int,
             env_extra: dict[str, str]) -> dict[str, str]:
    """The environment of one rank: ours, the caller's extras, then the rendezvous vars."""
    env = dict(os.environ)
    env.update({key: str(value) for key, value in env_extra.items()})
    env.update({
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": str(threads),
        # Unbuffered so that the log tail printed on a failure holds the last words.
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _child_setup() -> Callable[[], None]:
    """A preexec_fn run in each rank between fork and exec."""
    die_with_launcher = parent_death_signal()

    def setup() -> None:
        # A launcher started in the background (nohup, `&` in a script) runs with SIGINT
        # ignored and its children inherit that: the SIGINT we forward would do nothing.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        die_with_launcher()  # the kernel stops us with the launcher

    return setup


def _write(stream: IO[str], data: bytes) -> None:
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        buffer.write(data)
    else:  # a text-only stream (some test harnesses replace sys.stdout)
        stream.write(data.decode(errors="replace"))
    stream.flush()


def _tee(pipe: IO[bytes], console: IO[str], log: IO[bytes], lock: threading.Lock) -> None:
    """Copy a pipe to the console and the log as bytes arrive (progress lines included)."""
    read = getattr(pipe, "read1", pipe.read)
    while chunk := read(65536):
        with lock:
            log.write(chunk)
            log.flush()
            _write(console, chunk)
    pipe.close()


def _exit_code(returncode: int) -> int:
    """Shell convention: a child killed by signal N exits 128 + N."""
    return returncode if returncode >= 0 else 128 - returncode


def _signal_rank(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # already gone (a zombie's group cannot be signalled on some kernels)


def _stop(procs: list[subprocess.Popen], sig: int, grace_s: float,
          hurry: Callable[[], bool]) -> None:
    """Send `sig` to every live rank, then SIGKILL whatever is left after `grace_s`."""
    for proc in procs:
        if proc.poll() is None:
            _signal_rank(proc, sig)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and not hurry():
        if all(proc.poll() is not None for proc in procs):
            break
        time.sleep(POLL_S)
    for proc in procs:
        # The whole group: a rank that exited may still have orphaned workers in it.
        _signal_rank(proc, signal.SIGKILL)
        proc.wait()


def _start_ranks(cmd: list[str], world_size: int, log_dir: Path, env_extra: dict[str, str],
                 threads: int) -> tuple[list[subprocess.Popen], list[IO[bytes]]]:
    """Every rank started before any tee thread exists (fork + preexec_fn with threads
    around is what Python's docs warn about)."""
    port = free_port()
    preexec = _child_setup()
    # A zygote (launcher/zygote.py) forks trainer ranks with torch and megatron imported.
    zygote = os.environ.get(ZYGOTE_ENV) if is_trainer_command(cmd) else None
    procs: list[Any] = []  # subprocess.Popen or ZygoteRank
    logs: list[IO[bytes]] = []
    try:
        for rank in range(world_size):
            logs.append(open(log_dir / f"rank_{rank}.log", "ab"))
            # Appended, not truncated: a resumed run keeps the logs of its earlier attempts.
            logs[-1].write(f"=== chatforge: rank {rank} of {world_size} started "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
            logs[-1].flush()
            env = rank_env(rank, world_size, port, threads, env_extra)
            if zygote:
                try:
                    procs.append(ZygoteRank(zygote, cmd, env, stdout=None if rank == 0 else logs[-1],
                                            stderr=None, merge_stderr=rank > 0))
                    continue
                except OSError:  # no zygote there, or it has another `trainer`: start by exec
                    zygote = None
            procs.append(subprocess.Popen(
                cmd, env=env,
                stdout=subprocess.PIPE if rank == 0 else logs[-1],
                stderr=subprocess.PIPE if rank == 0 else subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=preexec,
            ))
    except BaseException:
        _stop(procs, signal.SIGKILL, 0.0, lambda: True)
        for log in logs:
            log.close()
        raise
    return procs, logs


def _first_failure(procs: list[subprocess.Popen], interrupted: Callable[[], bool],
                   watchdog: Watchdog, stalls: list[Stall]) -> Optional[int]:
    """Block until every rank succeeded (None), a rank failed (its rank) or a signal came
    (-1); -3 when every rank stopped with EXIT_REQUEUE (a stop signal, checkpoint saved: the
    ranks agree on the step, so none is hurried); -4 when the watchdog found a rank without
    progress (appended to `stalls`). Among ranks found failed in the same poll the lowest
    rank is named."""
    while not interrupted():
        codes = [proc.poll() for proc in procs]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0, EXIT_REQUEUE)]
        if failed:
            return failed[0]
        if all(code in (0, EXIT_REQUEUE) for code in codes):
            return -3 if EXIT_REQUEUE in codes else None
        stall = watchdog.poll(gone=[rank for rank, code in enumerate(codes) if code is not None],
                              state=lambda rank: process_state(procs[rank].pid))
        if stall is not None:
            stalls.append(stall)
            return -4
        time.sleep(POLL_S)
    return -1


def run_local(cmd: list[str], world_size: int, run_dir: Path, env_extra: dict[str, str],
              threads: int, grace_s: float = GRACE_S, hang_timeout: float = 0.0) -> int:
    """Run `cmd` as `world_size` ranks on this machine; return the job's exit code.

    Rank 0 writes to the console and <run_dir>/logs/rank_0.log, rank N to rank_N.log. When
    a rank fails the others get SIGTERM (SIGKILL after `grace_s`), the failing rank's log
    tail is printed and its exit code returned. When a rank's heartbeat has not moved for
    `hang_timeout` seconds (0: never) every rank is stopped the same way and EXIT_HANG
    returned. SIGINT/SIGTERM to the launcher are forwarded to every rank; a second one kills
    them at once.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: must be >= 1")
    log_dir = Path(run_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    clear_failure(run_dir)  # an earlier attempt's
    watchdog = Watchdog(run_dir, world_size, hang_timeout)  # before the ranks: old beats
    procs, logs = _start_ranks(cmd, world_size, log_dir, env_extra, threads)
    received: list[int] = []
    stalls: list[Stall] = []
    restore = _install_handlers(received)
    lock = threading.Lock()
    tees = [threading.Thread(target=_tee, args=(pipe, console, logs[0], lock), daemon=True)
            for pipe, console in ((procs[0].stdout, sys.stdout), (procs[0].stderr, sys.stderr))]
    for tee in tees:
        tee.start()
    failed: Optional[int] = -2  # stays -2 only if the launcher itself raised
    try:
        failed = _first_failure(procs, lambda: bool(received), watchdog, stalls)
    finally:
        # Also on an unexpected error in the launcher itself: never leave ranks behind.
        polite = received[0] if received else signal.SIGTERM
        patience = 1 if failed == -1 else 0  # signals tolerated before skipping the grace
        _stop(procs, polite, grace_s, lambda: len(received) > patience)
        for tee in tees:
            tee.join(timeout=5.0)
        for log in logs:
            log.close()
        restore()
    if failed is None:
        return 0
    if failed == -1:
        print(f"chatforge: stopped by {signal.Signals(received[0]).name}", file=sys.stderr)
        return 128 + received[0]
    if failed == -3:
        print(f"chatforge: stopped after saving a checkpoint (exit {EXIT_REQUEUE}); rerun the "
              f"same command to resume", file=sys.stderr)
        return EXIT_REQUEUE
    if failed == -4:
        line = f"{stalls[0].message(hang_timeout)}; stopped every rank (exit {EXIT_HANG})"
        record_failure(run_dir, stalls[0].rank, EXIT_HANG, line)
        print(f"chatforge: {line}. {_resume_hint(run_dir)}", file=sys.stderr)
        return EXIT_HANG
    code = _exit_code(procs[failed].returncode)
    path = log_dir / f"rank_{failed}.log"
    line = death_line(failed, code, watchdog.last_beat(failed))
    record_failure(run_dir, failed, code, line)
    print(f"chatforge: {line}; last lines of {path}:\n{log_tail(path)}", file=sys.stderr)
    return code


def _resume_hint(run_dir: Path) -> str:
    latest = Path(run_dir) / "checkpoints" / "latest"
    try:
        return (f"The last complete checkpoint is {latest.parent / latest.read_text().strip()}; "
                f"rerun the same command to resume from it.")
    except OSError:
        return "No checkpoint was saved yet; rerun the same command to start again."


def _install_handlers(received: list[int]) -> Callable[[], None]:
    """Record SIGINT/SIGTERM instead of dying so that the ranks can be stopped in order;
    returns the function that puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def record(signum: int, frame: object) -> None:
        received.append(signum)

    for sig in previous:
        signal.signal(sig, record)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
