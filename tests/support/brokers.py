"""Both brokers for the fault tests: the session's Redis, and a RabbitMQ vhost of its own.

RabbitMQ has no embedded form: where none answers on 127.0.0.1:5672 (or `rabbitmqctl` is
missing, as on a newcomer's machine), the RabbitMQ cases skip and say why.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from pipeline.cli import local

RABBITMQ_PORT = 5672


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """An AMQP URL on a vhost created for this test session; deleted after."""
    if not local.port_open("127.0.0.1", RABBITMQ_PORT):
        pytest.skip("RabbitMQ: nothing answers on 127.0.0.1:5672 (no embedded form exists)")
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("RabbitMQ: rabbitmqctl is not installed, so no vhost can be made")
    vhost = f"pipeline-test-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@127.0.0.1:{RABBITMQ_PORT}/{vhost}"
    finally:
        # rabbitmqctl may report a failure while the vhost's last connections close even
        # though the vhost is gone: check the listing rather than the exit status.
        with contextlib.suppress(subprocess.SubprocessError):
            _rabbitmqctl("delete_vhost", vhost)
        listed = subprocess.run(
            ["rabbitmqctl", "list_vhosts", "-q", "--no-table-headers"],
            capture_output=True, text=True, timeout=60,
        ).stdout.split()  # fmt: skip
        assert vhost not in listed, f"RabbitMQ vhost {vhost} was not deleted"


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Each broker in turn (a parametrised fixture for the fault tests)."""
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return str(request.getfixturevalue("rabbitmq_url"))


def unacked_on_rabbitmq(vhost_url: str, queue: str) -> int:
    """Messages of `queue` delivered to consumers and not acked yet (held by workers)."""
    vhost = vhost_url.rsplit("/", 1)[-1]
    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-p", vhost, "--no-table-headers", "-q",
         "name", "messages_unacknowledged"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    for line in out.splitlines():
        name, _, count = line.strip().partition("\t")
        if name == queue:
            return int(count or 0)
    return 0
