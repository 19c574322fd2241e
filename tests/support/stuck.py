"""Which threads of a process wait in the kernel on a socket to a given TCP port, read from
/proc (Linux x86_64, as root or with ptrace rights over the process), and for how long.

A thread blocked in a read, `poll`, `ppoll`, `epoll_wait` or `select`-free receive on a socket
is found by its system call (`/proc/PID/task/TID/syscall`), the descriptors that call waits
on (its arguments; a `poll` array read from `/proc/PID/mem`; an epoll set's from `fdinfo`),
and those descriptors' sockets (`/proc/PID/fd`, `/proc/PID/net/tcp`). A socket's inode names
one connection for its whole life, so the same thread seen waiting on the same inode from
one sample to another is one wait, however many times psycopg re-enters `poll` meanwhile.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable

# x86_64 system call numbers of the calls a client waits for an answer in.
_FD_FIRST = {0: "read", 45: "recvfrom", 47: "recvmsg"}  # the descriptor is the first argument
_POLL = {7: "poll", 271: "ppoll"}  # an array of struct pollfd {int fd; short; short}
_EPOLL = {232: "epoll_wait", 281: "epoll_pwait", 441: "epoll_pwait2"}  # an epoll descriptor


def unavailable() -> str | None:
    """Why the stacks cannot be read here (None: they can)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"reads x86_64 Linux system calls; this is {sys.platform} {platform.machine()}"
    try:
        with open(f"/proc/{os.getppid()}/syscall") as f:  # another process: needs ptrace rights
            f.read()
    except OSError as error:
        return f"/proc/PID/syscall of another process cannot be read ({error}): run as root"
    return None


def _sockets_to(pid: int, port: int) -> set[int]:
    """Inodes of the TCP sockets (in `pid`'s network namespace) whose remote port is `port`."""
    inodes = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if int(fields[2].rsplit(":", 1)[1], 16) == port:
                        inodes.add(int(fields[9]))
        except (OSError, StopIteration):
            continue
    return inodes


def _inode(pid: int, fd: int) -> int | None:
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    if target.startswith("socket:["):
        return int(target[8:-1])
    return None


def _waited_fds(pid: int, tid: int) -> tuple[str, list[int]] | None:
    """The system call thread `tid` is blocked in and the descriptors it waits on."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return None
    if not fields or fields[0] in ("running", "-1"):
        return None
    nr, args = int(fields[0]), [int(a, 16) for a in fields[1:7]]
    if nr in _FD_FIRST:
        return _FD_FIRST[nr], [args[0]]
    if nr in _POLL:
        count = min(args[1], 64)
        try:
            with open(f"/proc/{pid}/mem", "rb") as mem:
                mem.seek(args[0])
                raw = mem.read(8 * count)
        except (OSError, ValueError, OverflowError):
            return None
        return _POLL[nr], [fd for fd, _, _ in struct.iter_unpack("ihh", raw) if fd >= 0]
    if nr in _EPOLL:
        fds = []
        try:
            with open(f"/proc/{pid}/fdinfo/{args[0]}") as f:
                for line in f:
                    if line.startswith("tfd:"):
                        fds.append(int(line.split()[1]))
        except OSError:
            return None
        return _EPOLL[nr], fds
    return None


def waits(pid: int, port: int) -> dict[int, tuple[str, int]]:
    """The threads of `pid` blocked on a socket to `port`: {tid: (system call, socket inode)}."""
    wanted = _sockets_to(pid, port)
    found: dict[int, tuple[str, int]] = {}
    if not wanted:
        return found
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return found
    for tid in tids:
        waited = _waited_fds(pid, tid)
        if waited is None:
            continue
        call, fds = waited
        for fd in fds:
            inode = _inode(pid, fd)
            if inode in wanted:
                found[tid] = (call, inode)
                break
    return found


@dataclasses.dataclass
class Wait:
    """One thread seen waiting on one socket: first and last seen (monotonic seconds)."""

    pid: int
    tid: int
    call: str
    inode: int
    first: float
    last: float

    @property
    def seconds(self) -> float:
        return self.last - self.first


class Watch:
    """Samples, in a thread, every `interval` s, the threads of the processes `pids()` gives
    that wait on a socket to `port`; `longest()` is the longest single wait seen."""

    def __init__(self, pids: Callable[[], Iterable[int]], port: int, interval: float = 0.1):
        self._pids = pids
        self._port = port
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stuck-watch", daemon=True)
        self.waits: dict[tuple[int, int, int], Wait] = {}
        self.samples = 0

    def start(self) -> Watch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def __enter__(self) -> Watch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for pid in list(self._pids()):
                for tid, (call, inode) in waits(pid, self._port).items():
                    key = (pid, tid, inode)
                    seen = self.waits.get(key)
                    if seen is None:
                        self.waits[key] = Wait(pid, tid, call, inode, now, now)
                    else:
                        seen.last = now
            self.samples += 1
            self._stop.wait(self._interval)

    def longest(self, pids: Iterable[int] | None = None) -> Wait | None:
        chosen = set(pids) if pids is not None else None
        found = [w for w in self.waits.values() if chosen is None or w.pid in chosen]
        return max(found, key=lambda w: w.seconds, default=None)
