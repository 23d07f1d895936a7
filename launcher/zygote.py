"""Trainer ranks forked from a process that has already imported torch and megatron.

A rank of `python -m trainer` spends about 6 s of CPU importing torch, megatron and the
trainer before its first step. Where one machine starts many small local jobs (the test
suite: hundreds of launches; a recipe or a sweep run locally), that import is most of their
cost. A zygote imports it all once and then forks one child per rank on request; a fork
takes milliseconds.

- `serve(socket_path)` (`python -m launcher.zygote SOCKET`) is the zygote: it imports the
  trainer's modules (nothing is initialised: no process group, no megatron state, no
  threads), listens on a unix socket, and for every request forks a child that becomes the
  rank: its own session, the launcher's stdin/stdout/stderr (passed as file descriptors),
  environment and working directory, then `trainer.__main__` run as `python -m trainer`
  would (so a multiprocessing spawn from it re-imports `trainer.__main__`, as usual). When
  a child ends the zygote reaps it and sends its wait status on the request's connection.
- `ZygoteRank`, what `launcher.local` uses instead of `subprocess.Popen` when the
  environment names a zygote (`CHATFORGE_ZYGOTE=<socket>`) and the command is the trainer:
  the same `pid`, `poll()`, `wait()`, `returncode`, `stdout`, `stderr`. Signals go to the
  rank's process group as for a Popen rank. The rank is the zygote's child, not the
  launcher's, so instead of the kernel's parent-death signal it watches the launcher's pid
  and stops itself (SIGTERM, then as a Popen rank would die) when the launcher is gone.

This module stays torch-free; only the zygote process imports torch (inside `serve`).
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

ENV = "CHATFORGE_ZYGOTE"  # the socket of a running zygote; unset: ranks are started by exec
TRAINER_MODULE = "trainer"
_PRELOAD = ("torch", "megatron.core", "trainer.loop", "trainer.stages", "trainer.checkpointing",
            "trainer.rewards", "trainer.runtime", "parallel.engine", "parallel.checkpoint",
            "parallel.inference")
_MAX_REQUEST = 1 << 20


def is_trainer_command(cmd: list[str]) -> bool:
    """`[<this python>, -m, trainer, CONFIG]`: what a zygote can start."""
    return len(cmd) == 4 and cmd[1:3] == ["-m", TRAINER_MODULE] and \
        os.path.realpath(cmd[0]) == os.path.realpath(sys.executable)


# -- the launcher's side ------------------------------------------------------------------
class ZygoteRefused(OSError):
    """The zygote will not start this rank (another `trainer` package): start it by exec."""


class ZygoteRank:
    """A rank forked by the zygote at `socket_path`, with subprocess.Popen's interface as
    launcher.local uses it. stdout/stderr: the given file objects (or None to create a pipe
    whose read end becomes `.stdout` / `.stderr`, as subprocess.PIPE does)."""

    def __init__(self, socket_path: str, cmd: list[str], env: dict[str, str],
                 stdout: Optional[IO[bytes]], stderr: Optional[IO[bytes]], merge_stderr: bool = False) -> None:
        self.returncode: Optional[int] = None
        self._buffer = b""  # what the zygote sent past the last full line (its status may follow the pid)
        self.stdout: Optional[IO[bytes]] = None
        self.stderr: Optional[IO[bytes]] = None
        ours: list[int] = []  # write ends of our pipes, closed here once the child has them
        out_fd = self._target(stdout, "stdout", ours)
        err_fd = out_fd if merge_stderr else self._target(stderr, "stderr", ours)
        null = os.open(os.devnull, os.O_RDONLY)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(socket_path)
            request = json.dumps({"argv": cmd[3:], "env": env, "cwd": os.getcwd(),
                                  "launcher": os.getpid()}).encode()
            socket.send_fds(self._sock, [request], [null, out_fd, err_fd])
            self._sock.shutdown(socket.SHUT_WR)
            reply = self._read_line()
        except BaseException:
            self._sock.close()
            for fd in ours:
                os.close(fd)
            raise
        finally:
            os.close(null)
        for fd in ours:
            os.close(fd)
        if reply is None or "pid" not in reply:
            self._sock.close()
            raise ZygoteRefused(f"zygote at {socket_path} did not start the rank: {reply}")
        self.pid = int(reply["pid"])

    def _target(self, given: Optional[IO[bytes]], name: str, ours: list[int]) -> int:
        if given is not None:
            return given.fileno()
        read, write = os.pipe()
        setattr(self, name, os.fdopen(read, "rb", buffering=0))
        ours.append(write)
        return write

    def _read_line(self, block: bool = True) -> Optional[dict[str, Any]]:
        data = self._buffer
        while b"\n" not in data:
            if not block and not select.select([self._sock], [], [], 0)[0]:
                self._buffer = data
                return None
            chunk = self._sock.recv(4096)
            if not chunk:  # the zygote is gone: the rank's fate is unknown; say it died
                self._buffer = b""
                return {"status": -int(signal.SIGKILL)} if data == b"" else json.loads(data)
            data += chunk
        line, self._buffer = data.split(b"\n", 1)
        return json.loads(line)

    def _settle(self, block: bool) -> Optional[int]:
        if self.returncode is None:
            reply = self._read_line(block)
            if reply is not None:
                self.returncode = int(reply["status"])
                self._sock.close()
        return self.returncode

    def poll(self) -> Optional[int]:
        return self._settle(block=False)

    def wait(self, timeout: Optional[float] = None) -> int:
        if timeout is not None:
            deadline = time.monotonic() + timeout
            while self.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank {self.pid} still running after {timeout} s")
                time.sleep(0.05)
            return int(self.returncode)  # type: ignore[arg-type]
        return int(self._settle(block=True))  # type: ignore[arg-type]


@contextlib.contextmanager
def started(log: Path) -> Iterator[str]:
    """A zygote for the duration (a local recipe: a dozen trainer launches), its output in
    `log`; `CHATFORGE_ZYGOTE` names it meanwhile. Nothing waits for it: until its imports are
    done its socket does not exist and ranks start by exec. An outer zygote is used as is."""
    if os.environ.get(ENV):
        yield os.environ[ENV]
        return
    directory = tempfile.mkdtemp(prefix="chatforge-zygote-")
    sock = os.path.join(directory, "zygote.sock")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "launcher.zygote", sock], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    os.environ[ENV] = sock
    try:
        yield sock
    finally:
        os.environ.pop(ENV, None)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


# -- the zygote ---------------------------------------------------------------------------
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def parent_death_signal() -> Callable[[], None]:
    """A function that asks the kernel for SIGTERM to the calling process when its parent
    dies (Linux PR_SET_PDEATHSIG; a no-op elsewhere). libc's prctl is resolved here, so the
    function is safe to call between fork and exec (a preexec_fn)."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            prctl = None

    def arm() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))

    return arm


def _die_with_parent() -> None:
    """SIGTERM to the zygote when the process that started it dies, so that a killed
    launcher leaves no zygote behind; the SIGTERM handler then stops its ranks."""
    parent_death_signal()()


def _watch_launcher(pid: int) -> None:
    """In a rank: stop (SIGTERM to ourselves, as the parent-death signal of a Popen rank) once
    the launcher process is gone."""
    while True:
        time.sleep(0.5)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        except PermissionError:
            pass


def _become_rank(request: dict[str, Any], fds: list[int], inherited: list[Any]) -> None:
    """In the forked child (already in a session of its own): take the launcher's streams,
    environment and directory, and run the trainer as `python -m trainer ARGV` would. Never
    returns."""
    code = 1
    try:
        for held in inherited:  # the zygote's sockets and pipes: not the rank's business
            if isinstance(held, int):
                os.close(held)
            else:
                held.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in set(fds):
            if fd > 2:
                os.close(fd)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        threading.Thread(target=_watch_launcher, args=(int(request["launcher"]),), daemon=True).start()
        import runpy

        sys.argv = [TRAINER_MODULE, *request["argv"]]
        try:
            runpy.run_module(TRAINER_MODULE, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - said on the rank's stderr, then the exit below
        import traceback

        traceback.print_exc()
    finally:
        # What an interpreter's exit does and os._exit skips: the atexit handlers, among them
        # multiprocessing's, which stops the Manager server that megatron's checkpoint writer
        # spawned. Skipped, that server outlives the rank, orphaned, whenever no launcher is
        # left to kill the rank's group (a killed launcher whose ranks stop on their own).
        import atexit

        try:
            atexit._run_exitfuncs()
        except BaseException:  # noqa: BLE001 - exiting anyway
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe: nothing more to say
                pass
        os._exit(code)


def _other_trainer(request: dict[str, Any]) -> str:
    """Why this zygote must not start the request ('' if it may): `python -m trainer` in the
    rank's working directory and PYTHONPATH would import another `trainer` package than the
    one preloaded here (e.g. a test's stand-in); the launcher then starts the rank by exec."""
    import importlib.machinery
    from pathlib import Path

    import trainer

    ours = Path(trainer.__file__).resolve().parent
    first = [request["cwd"], *[p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]]
    spec = importlib.machinery.PathFinder.find_spec(TRAINER_MODULE, first)
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent == ours:
        return ""
    return f"`trainer` would be {Path(spec.origin).parent}, this zygote has {ours}"


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 3)
    while chunk := conn.recv(_MAX_REQUEST):
        data += chunk
    return json.loads(data), list(fds)


def serve(socket_path: str) -> None:
    """Run the zygote until it gets SIGTERM/SIGINT: preload, then fork ranks on request."""
    import importlib

    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the signal was armed
        return

    for name in _PRELOAD:
        importlib.import_module(name)
    if threading.active_count() != 1:  # a fork would copy a process in the middle of something
        raise RuntimeError(f"zygote: {threading.active_count()} threads after the imports; forking is unsafe")
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: os.write(wake_w, b"."))
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _: stopping.append(signum))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    listener.bind(socket_path)
    listener.listen(64)
    children: dict[int, socket.socket] = {}
    print(f"zygote ready on {socket_path}", flush=True)
    try:
        while not stopping:
            try:
                ready, _, _ = select.select([listener, wake_r], [], [], 1.0)
            except InterruptedError:
                ready = []
            if wake_r in ready:
                os.read(wake_r, 4096)
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                conn = children.pop(pid, None)
                if conn is not None:
                    # What the rank started may outlive it in its session (the checkpoint
                    # writer's Manager server of a rank that died): it goes with the rank,
                    # as local._stop does for ranks started by exec.
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    try:
                        conn.sendall(json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                    except OSError:
                        pass  # the launcher went away first
                    conn.close()
            if listener in ready:
                conn, _ = listener.accept()
                try:
                    request, fds = _receive(conn)
                except (OSError, ValueError) as exc:
                    conn.close()
                    print(f"zygote: bad request ({exc})", file=sys.stderr, flush=True)
                    continue
                refusal = _other_trainer(request)
                if refusal:
                    for fd in fds:
                        os.close(fd)
                    conn.sendall(json.dumps({"refused": refusal}).encode() + b"\n")
                    conn.close()
                    continue
                settled_r, settled_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.setsid()  # before the launcher learns the pid: it may signal the group at once
                    os.close(settled_r)
                    os.write(settled_w, b".")
                    os.close(settled_w)
                    _become_rank(request, fds, [listener, conn, wake_r, wake_w, *children.values()])
                os.close(settled_w)
                os.read(settled_r, 1)  # the child has its session (or has died: b"")
                os.close(settled_r)
                for fd in fds:
                    os.close(fd)
                children[pid] = conn
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    finally:
        for pid in children:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        listener.close()
        if os.path.exists(socket_path):
            os.unlink(socket_path)


if __name__ == "__main__":
    serve(sys.argv[1])
