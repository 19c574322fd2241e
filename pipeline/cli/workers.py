"""Celery worker and Flower processes started by the CLI: commands, start, stop, signals."""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from types import FrameType
from typing import Any

from pipeline import errors

FLOWER_AUTH_ENV = "FLOWER_BASIC_AUTH"
# Flower's task list hides arguments and results by default; the file URL and the outcome
# (stats, or why a duplicate was skipped) are what a pipeline operator looks for.
FLOWER_COLUMNS = "name,uuid,state,args,result,exception,received,runtime"

# Every signal a supervisor, a terminal or an operator sends a Celery worker, and what Celery
# does with it: TERM warm shutdown, INT the same (twice: cold), QUIT cold shutdown, HUP
# restart, USR1 dump the threads' tracebacks, USR2 open a remote debugger.
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
STOP_TIMEOUT = 20.0


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn: the child gets SIGTERM when this process dies, even by SIGKILL (Linux).

    The children below have sessions of their own (so a terminal's Ctrl-C reaches them once,
    through us), which also puts them out of reach of a kill of our process group: without
    this, SIGKILL to us or to our group would orphan them.
    """
    if not sys.platform.startswith("linux"):  # pragma: no cover - Linux is what we run on
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover
        return None
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # we died before the line above: nobody would tell it
            os._exit(1)

    return preexec


def worker_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "pipeline", "worker", *args]


def flower_command(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "pipeline", "flower", f"--port={port}", *extra]


def exec_worker(celery_args: Sequence[str], env: dict[str, str]) -> None:
    """Become `celery -A pipeline worker ARGS`: same pid, so every signal reaches Celery."""
    command = worker_command(*celery_args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)


def run_forwarding(command: Sequence[str], env: dict[str, str] | None = None) -> int:
    """Run `command` as a child, pass every signal in FORWARDED_SIGNALS on; its exit status.

    For when this process must outlive the child (it owns private servers to stop after it).
    The child has a session of its own, so a terminal's Ctrl-C reaches it once, through here,
    and not twice (a second SIGINT is a cold shutdown for Celery).
    """
    proc = subprocess.Popen(
        list(command), env=env, start_new_session=True, preexec_fn=die_with_parent()
    )

    def forward(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        while True:
            try:
                code = proc.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
                continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    # A child ended by a signal: the shell's convention, 128 + signal number.
    return 128 - code if code < 0 else code


def start_workers(
    app: Any,
    count: int,
    log_dir: pathlib.Path,
    *,
    env: dict[str, str],
    concurrency: int = 2,
    name: str = "demo",
) -> list[subprocess.Popen[bytes]]:
    """Start worker processes of `app` with `env`; returns them once they answer a ping.

    Each gets a session of its own (a terminal's Ctrl-C reaches this process only, which then
    stops them in order); stop_workers() ends them.
    """
    procs: list[subprocess.Popen[bytes]] = []
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        for n in range(1, count + 1):
            cmd = worker_command(
                "-c",
                str(concurrency),
                "-n",
                f"{name}{n}-{os.getpid()}@%h",
                "--without-gossip",
                "--without-mingle",
                "-l",
                "info",
            )
            procs.append(_start_logged(cmd, log_dir / f"worker{n}.log", env))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            replies = app.control.ping(timeout=0.5) or []
            if len(replies) >= count:
                return procs
            if any(p.poll() is not None for p in procs):
                break
    except BaseException:
        # Interrupted while starting (Ctrl-C, SIGTERM): none of them may outlive us.
        stop_workers(procs)
        raise
    stop_workers(procs)
    raise errors.PipelineError(f"workers did not start; see the logs in {log_dir}")


def stop_workers(procs: Iterable[subprocess.Popen[bytes]], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM each process (warm shutdown), then SIGKILL its whole group if it lingers."""
    procs = list(procs)
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        # The group too: pool processes left behind by a main process that died first.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def start_flower(port: int, log_dir: pathlib.Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A local Flower: bound to 127.0.0.1, no password, its log in `log_dir`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**env, "FLOWER_TASKS_COLUMNS": FLOWER_COLUMNS}
    env.pop(FLOWER_AUTH_ENV, None)
    return _start_logged(flower_command(port, "--address=127.0.0.1"), log_dir / "flower.log", env)


def _start_logged(
    command: list[str], log_path: pathlib.Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """`command` in a session of its own, its output in `log_path`, ending with us (Linux)."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
