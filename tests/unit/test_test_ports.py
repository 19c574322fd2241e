"""The tests' own port helper: a server that asks for several ports at once gets distinct
ones (SeaweedFS asks for seven; given one twice, it failed to bind in CI)."""

from __future__ import annotations

import socket

from tests.support import processes
from tests.support.processes import _PORTS_PER_PROCESS, free_port


def test_free_port__never_twice_until_the_range_is_used_up() -> None:
    ports = [free_port() for _ in range(_PORTS_PER_PROCESS // 4)]
    assert len(set(ports)) == len(ports)


def test_free_port__skips_a_port_something_listens_on() -> None:
    taken = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", taken))
        held.listen()
        processes._unused.append(taken)  # next in line, but bound by someone else now
        given = free_port()
    assert given != taken
    assert taken not in processes._unused
