"""Processes the tests start: the repository root, a free port, and one way to spawn a server.

Every helper that starts a subprocess (workers, Flower, SeaweedFS, Prometheus, a CLI command in
the background) goes through `spawn`: its own session (a signal sent to its group reaches
nothing of pytest's), no stdin, its output in a log file.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
import socket
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO, Any

import psutil

REPO = pathlib.Path(__file__).resolve().parents[2]

# free_port draws from a range of its own per pytest-xdist process (gw0, gw1, ...), below the
# kernel's ephemeral range (32768-60999 by default): a port one process has just seen free is
# not handed to another test process, nor to an outgoing connection, before it is bound.
_PORTS_FROM, _PORTS_PER_PROCESS = 20_000, 2_000
_unused: list[int] = []  # this process's range, shuffled: free_port takes from the end


def xdist_index() -> int:
    """This test process's number under pytest-xdist (gw0 -> 0, ...); 0 without xdist."""
    return int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking), and not one
    this process handed out before, until its whole range has been: a server given several
    ports at once (SeaweedFS takes seven) was sometimes given one twice, and failed to bind."""
    low = _PORTS_FROM + xdist_index() * _PORTS_PER_PROCESS
    for _ in range(200):
        if not _unused:
            _unused.extend(random.sample(range(low, low + _PORTS_PER_PROCESS), _PORTS_PER_PROCESS))
        port = _unused.pop()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{low + _PORTS_PER_PROCESS - 1} after 200 tries")


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (those still alive)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tcp_links(pid: int, port: int) -> dict[int, list[Any]]:
    """The TCP connections to `port` (the remote end) of a process tree, by pid; a process
    with none, or gone meanwhile, is left out."""
    links: dict[int, list[Any]] = {}
    for proc in process_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            found = [
                c for c in proc.net_connections(kind="tcp") if c.raddr and c.raddr.port == port
            ]
            if found:
                links[proc.pid] = found
    return links


def spawn(
    argv: Sequence[str],
    *,
    log_path: pathlib.Path,
    env: Mapping[str, str] | None = None,
    cwd: pathlib.Path | None = REPO,
    stderr_path: pathlib.Path | None = None,
    append: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `argv` as the leader of a process group of its own, with no stdin, its standard
    output (and error, unless `stderr_path` is given) in `log_path`."""
    mode = "ab" if append else "wb"
    with log_path.open(mode) as out:
        if stderr_path is None:
            return _popen(argv, env, cwd, out, subprocess.STDOUT)
        with stderr_path.open(mode) as err:
            return _popen(argv, env, cwd, out, err)


def _popen(
    argv: Sequence[str],
    env: Mapping[str, str] | None,
    cwd: pathlib.Path | None,
    out: IO[bytes],
    err: IO[bytes] | int,
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=None if env is None else dict(env),
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
        start_new_session=True,
    )
