"""Flower shows each file's outcome: a real worker, real Flower through `pipeline flower`.

One worker and one Flower (behind basic auth, password only in the environment) run for the
module; three tasks go through them: a file that completes, the same file again (a skipped
duplicate) and a file that ends dead. The tests read Flower's HTTP API as an operator would.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from tests.support.flower_helpers import FlowerStack
from tests.support.processes import free_port, process_tree
from tests.support.workers import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(
    database_url: str, private_redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FlowerStack]:
    s = FlowerStack(
        database_url=database_url,
        broker_url=private_redis_url,
        log_dir=tmp_path_factory.mktemp("flower"),
    )
    try:
        s.reset_tables()
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def run(stack: FlowerStack) -> dict[str, Any]:
    """Start the worker and Flower, send the three tasks, wait for Flower to show them done."""
    port = free_port()
    stack.start_worker()
    stack.start_flower(port)
    node = stack.wait_ready(port)
    base = f"file:///data/flower-{uuid.uuid4().hex[:8]}"
    good, bad = f"{base}/good.csv", f"{base}/bad.csv?permanent=1"
    first, dead = stack.send(good), stack.send(bad)
    stack.wait_final(port, [first, dead])
    # Sent only once the first copy finished, so it meets a completed row (not a busy claim).
    duplicate = stack.send(good)
    tasks = stack.wait_final(port, [first, dead, duplicate])
    return {
        "port": port,
        "node": node,
        "good": good,
        "bad": bad,
        "first": tasks[first],
        "duplicate": tasks[duplicate],
        "dead": tasks[dead],
    }


def test_flower_workers__lists_our_worker_and_its_queue(
    stack: FlowerStack, run: dict[str, Any]
) -> None:
    # refresh=1 makes Flower broadcast inspect calls and wait 1 s (its inspect_timeout) for the
    # replies; on a loaded host our worker can answer later than that, and the listing is then
    # empty (CI saw it). An operator reloads the page: so does the test, for a while.
    def listing() -> dict[str, Any] | None:
        workers: dict[str, Any] = stack.api(run["port"], "/api/workers", refresh=1)
        mine = workers.get(run["node"], {})
        # Each inspect method is a broadcast of its own: wait for the two the test reads.
        return workers if mine.get("active_queues") and mine.get("registered") else None

    workers = wait_until(
        listing, timeout=30, what=f"Flower's inspect to list {run['node']}", describe=stack.describe
    )
    queues = [q["name"] for q in workers[run["node"]]["active_queues"]]
    assert queues == [stack.queue]
    assert "tests.sink" in workers[run["node"]]["registered"]


def test_flower_tasks__completed_file_is_success_with_its_stats(run: dict[str, Any]) -> None:
    task = run["first"]
    assert task["name"] == "tests.sink"
    assert run["good"] in task["args"]
    assert task["state"] == "SUCCESS", task
    assert task["worker"] == run["node"]
    result = task["result"]
    assert "skipped" not in result, result
    for stat in ("'attempt': 1", "'total': 1", "'filtered': 0", "'persisted': 1"):
        assert stat in result, result


def test_flower_tasks__duplicate_is_success_saying_skipped(run: dict[str, Any]) -> None:
    task = run["duplicate"]
    assert run["good"] in task["args"]
    assert task["state"] == "SUCCESS", task
    assert "'skipped': True" in task["result"], task["result"]
    assert "already completed" in task["result"], task["result"]
    assert "'persisted': 1" in task["result"], task["result"]  # the stats of the first run


def test_flower_tasks__dead_file_is_failure_with_the_error(run: dict[str, Any]) -> None:
    task = run["dead"]
    assert run["bad"] in task["args"]
    assert task["state"] == "FAILURE", task
    assert task["result"] is None
    exception = task["exception"]
    assert "dead" in exception, exception
    assert f"cannot process {run['bad']}" in exception, exception


def test_flower_outcomes__match_the_checkpoint_table(
    stack: FlowerStack, run: dict[str, Any]
) -> None:
    def status(url: str) -> str:
        return str(stack.scalar("SELECT status FROM file_checkpoints WHERE file_url = :u", u=url))

    assert status(run["good"]) == "completed"
    assert status(run["bad"]) == "dead"
    # The duplicate wrote nothing: one effect for the good file, none for the dead one.
    assert stack.scalar("SELECT count(*) FROM sink WHERE file_url = :u", u=run["good"]) == 1
    assert stack.scalar("SELECT count(*) FROM sink WHERE file_url = :u", u=run["bad"]) == 0


@pytest.mark.parametrize("path", ["/api/tasks", "/api/workers", "/tasks", "/"])
@pytest.mark.parametrize("credentials", ["none", "wrong password"])
def test_flower__refuses_requests_without_the_password(
    stack: FlowerStack, run: dict[str, Any], path: str, credentials: str
) -> None:
    auth = None if credentials == "none" else (stack.user, stack.password + "x")
    response = stack.get(run["port"], path, auth=auth)
    assert response.status_code == 401, (response.status_code, response.text[:200])
    assert "tests.sink" not in response.text


def test_flower__password_is_in_no_command_line(stack: FlowerStack, run: dict[str, Any]) -> None:
    processes = [p for proc in stack.procs for p in process_tree(proc.pid)]
    flowers = [p for p in processes if "flower" in p.cmdline()]
    workers = [p for p in processes if "worker" in p.cmdline()]
    assert flowers, "no Flower process found"
    assert workers, "no worker process found"
    for p in processes:
        assert not any(stack.password in arg for arg in p.cmdline()), p.cmdline()
    # It does reach Flower, through the environment (readable only by the same user).
    celery_flower = [p for p in flowers if "celery" in p.cmdline()]
    assert celery_flower, [p.cmdline() for p in flowers]
    assert celery_flower[0].environ().get("FLOWER_BASIC_AUTH") == stack.basic_auth


def test_flower_cli__sigterm_stops_flower_too(stack: FlowerStack, run: dict[str, Any]) -> None:
    """SIGTERM to `pipeline flower` (docker stop, a supervisor) must not orphan Flower."""
    port = free_port()
    proc = stack.start_flower(port)
    wait_until(
        lambda: _answers(stack, port),
        timeout=30,
        what=f"a second Flower on port {port}",
        describe=stack.describe,
    )
    tree = process_tree(proc.pid)
    assert len(tree) >= 2, [p.cmdline() for p in tree]  # the wrapper and Flower itself
    proc.popen.send_signal(signal.SIGTERM)  # the wrapper only, as docker stop does
    assert proc.popen.wait(timeout=20) == 0, proc.log()
    _gone, alive = psutil.wait_procs(tree, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
    assert not _answers(stack, port)


def test_flower_cli__sigkill_to_its_process_group_stops_flower_too(
    stack: FlowerStack, run: dict[str, Any]
) -> None:
    """Flower runs in a session of its own (Ctrl-C reaches it once, through the wrapper);
    a SIGKILL of the wrapper's process group must still not leave it serving."""
    port = free_port()
    proc = stack.start_flower(port)
    wait_until(
        lambda: _answers(stack, port),
        timeout=30,
        what=f"a third Flower on port {port}",
        describe=stack.describe,
    )
    tree = process_tree(proc.pid)
    assert len(tree) >= 2, [p.cmdline() for p in tree]
    proc.kill()  # SIGKILL to the wrapper's group: no handler runs, nothing is forwarded
    _gone, alive = psutil.wait_procs(tree, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
    assert not _answers(stack, port)


def _answers(stack: FlowerStack, port: int) -> bool:
    try:
        return stack.get(port, "/api/workers").status_code == 401
    except OSError:
        return False
