"""Real `celery worker` / `celery beat` subprocesses for the acceptance tests, and their fixtures.

A `Cluster` is one test's private world: a unique queue on the test Redis, the session's
Postgres database (tables emptied first), worker and beat subprocesses started with the env
`pipeline` reads, and `pipeline.app` in this process pointed at the same broker and queue so
the test can enqueue. Every process gets its own session (process group): teardown sends it
SIGCONT then SIGKILL, so nothing outlives the test, frozen or not.

The fixtures (`cluster`, `make_cluster`) are re-exported by tests/acceptance/conftest.py; a
test module elsewhere imports them by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psutil
import pytest
import redis
import sqlalchemy as sa

import pipeline
from pipeline.store.postgres import engine_url
from tests.support.celery_tasks import SINK_DDL
from tests.support.processes import REPO, spawn

DEFAULT_LEASE = 3.0
READY_TIMEOUT = 45.0


def redis_url_on_db(url: str, db: int) -> str:
    """The same Redis server, another database number."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{db}"))


def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
    describe: Callable[[], str] | None = None,
) -> Any:
    """Poll until `predicate()` is truthy and return its value; fail with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"\n{describe()}" if describe else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


@dataclasses.dataclass
class Proc:
    """One subprocess (worker or beat), leader of its own process group."""

    name: str
    kind: str
    popen: subprocess.Popen[bytes]
    log_path: pathlib.Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def children(self) -> list[psutil.Process]:
        """The pool processes (direct children of the worker's main process)."""
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    def child_pids(self) -> list[int]:
        return sorted(p.pid for p in self.children())

    def signal_child(self, pid: int, sig: signal.Signals) -> None:
        """Send `sig` to one pool process of this worker (refuses a pid that is not ours)."""
        if pid not in self.child_pids():
            raise AssertionError(f"{pid} is not a pool process of {self.name}: {self.child_pids()}")
        os.kill(pid, sig)

    def signal_group(self, sig: signal.Signals) -> None:
        """Send `sig` to the main process and all its children at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group (main process and pool) and reap it."""
        self.signal_group(signal.SIGCONT)  # a stopped process must not stay stopped forever
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


@dataclasses.dataclass
class Cluster:
    """One test's queue, database and subprocesses; see the module docstring."""

    tmp_path: pathlib.Path
    database_url: str
    broker_url: str
    lease: float = DEFAULT_LEASE
    queue: str = dataclasses.field(default_factory=lambda: f"t-{uuid.uuid4().hex[:10]}")
    procs: list[Proc] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.engine = sa.create_engine(
            engine_url(self.database_url), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
        )
        # The Redis client is for the tests' own looks at the broker; None on RabbitMQ.
        self.redis = (
            redis.Redis.from_url(self.broker_url) if self.broker_url.startswith("redis") else None
        )
        self.store = pipeline.open_store(self.database_url)

    # -- state ------------------------------------------------------------------------------

    def reset_tables(self) -> None:
        """Empty the checkpoint tables, the workers' heartbeats and the sink (created on first
        use)."""
        with self.engine.connect() as conn:
            conn.execute(sa.text(SINK_DDL))
            conn.execute(
                sa.text(
                    "TRUNCATE sink, file_checkpoints, file_attempts, pipeline_workers,"
                    " pipeline_batches, pipeline_chores CASCADE"
                )
            )

    def rows(self, query: str, **params: Any) -> list[sa.Row[Any]]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(query), params))

    def scalar(self, query: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(query), params).scalar()

    def db_now(self) -> Any:
        """The database's clock (the one completed_at and started_at are written with)."""
        return self.scalar("SELECT clock_timestamp()")

    def status_counts(self) -> dict[str, int]:
        rows = self.rows("SELECT status, count(*) AS n FROM file_checkpoints GROUP BY status")
        return {r.status: int(r.n) for r in rows}

    def attempts(self, file_url: str) -> list[sa.Row[Any]]:
        return self.rows(
            "SELECT attempt, token, worker, task_id, outcome, error_class, error_message,"
            " started_at, ended_at, start_position, end_position, chunks"
            " FROM file_attempts WHERE file_url = :u ORDER BY token",
            u=file_url,
        )

    def checkpoint(self, file_url: str) -> sa.Row[Any] | None:
        rows = self.rows("SELECT * FROM file_checkpoints WHERE file_url = :u", u=file_url)
        return rows[0] if rows else None

    def sink_rows(self, file_url: str | None = None) -> list[sa.Row[Any]]:
        if file_url is None:
            return self.rows("SELECT * FROM sink ORDER BY id")
        return self.rows("SELECT * FROM sink WHERE file_url = :u ORDER BY id", u=file_url)

    def summary(self) -> str:
        """A short picture of the tables and processes, for failure messages."""
        return (
            f"status counts: {self.status_counts()}; "
            f"sink rows: {self.scalar('SELECT count(*) FROM sink')}; "
            f"queue {self.queue} length: {self.queue_length()}; "
            f"procs: {[(p.name, p.alive()) for p in self.procs]}"
        )

    def wait_sql(
        self, query: str, *, timeout: float, what: str | None = None, **params: Any
    ) -> Any:
        """Poll a one-value query until it is truthy; its value."""
        return wait_until(
            lambda: self.scalar(query, **params),
            timeout=timeout,
            what=what or query,
            describe=self.summary,
        )

    def wait_status(self, file_url: str, status: str, *, timeout: float) -> sa.Row[Any]:
        self.wait_sql(
            "SELECT status = :s FROM file_checkpoints WHERE file_url = :u",
            timeout=timeout,
            what=f"{file_url} to be {status}",
            u=file_url,
            s=status,
        )
        row = self.checkpoint(file_url)
        assert row is not None
        return row

    def wait_claimed(self, file_url: str, *, attempt: int = 1, timeout: float = 20) -> sa.Row[Any]:
        """Wait until `file_url` is processing on `attempt`; the checkpoint row."""
        self.wait_sql(
            "SELECT status = 'processing' AND attempt = :a FROM file_checkpoints"
            " WHERE file_url = :u",
            timeout=timeout,
            what=f"{file_url} to be claimed (attempt {attempt})",
            u=file_url,
            a=attempt,
        )
        row = self.checkpoint(file_url)
        assert row is not None
        return row

    def wait_in_output_transaction(self, token: int, *, timeout: float = 10) -> None:
        """Wait until the claim `token` has its output transaction open (uncommitted writes).

        The store names that transaction's session `pipeline-claim:<token>` (sqlstore.py), so
        a takeover can end it; the same name shows here that the task is inside it.
        """
        self.wait_sql(
            "SELECT count(*) = 1 FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = :n",
            timeout=timeout,
            what=f"the output transaction of claim {token}",
            n=f"pipeline-claim:{token}",
        )

    def wait_all_terminal(self, expected: int, *, timeout: float) -> None:
        self.wait_sql(
            "SELECT count(*) = :n FROM file_checkpoints WHERE status IN ('completed', 'dead')",
            timeout=timeout,
            what=f"{expected} files to end completed or dead",
            n=expected,
        )

    # -- broker -----------------------------------------------------------------------------

    @property
    def broker(self) -> str:
        """`redis` or `rabbitmq`."""
        return "redis" if self.redis is not None else "rabbitmq"

    def queue_length(self) -> int:
        if self.redis is None:
            return rabbitmq_queue_depth(self.broker_url, self.queue)
        return sum(int(self.redis.llen(k)) for k in self.redis.scan_iter(match=f"{self.queue}*"))

    def deliveries(self) -> dict[str, int]:
        """How often each task id was handed to a worker (`received` lines in the logs)."""
        counts: dict[str, int] = {}
        for proc in self.procs:
            if proc.kind != "worker":
                continue
            for line in proc.log().splitlines():
                if "] received" in line and "Task " in line:
                    task_id = line.split("[", 2)[-1].split("]", 1)[0]
                    counts[task_id] = counts.get(task_id, 0) + 1
        return counts

    def send(self, file_url: str, *, task: Any = None, **options: Any) -> Any:
        """Enqueue `task` (default tests.sink) for `file_url` on this test's queue."""
        from tests.support.celery_tasks import sink

        return (task or sink).apply_async(args=[file_url], queue=self.queue, **options)

    def _cleanup_broker(self) -> None:
        if self.redis is not None:
            drop_queue_keys(self.redis, self.queue)
        # RabbitMQ: the queue lives in the test session's own vhost, deleted with it.

    # -- processes --------------------------------------------------------------------------

    def env(
        self,
        *,
        database_url: str | None = None,
        task_modules: str | None = "tests.support.celery_tasks",
        extra: dict[str, str] | None = None,
    ) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
        env.update(
            PIPELINE_DATABASE_URL=database_url or self.database_url,
            PIPELINE_BROKER_URL=self.broker_url,
            PIPELINE_QUEUE=self.queue,
            PIPELINE_TEST_LEASE=str(self.lease),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
            PYTHONUNBUFFERED="1",
        )
        if task_modules:
            env["PIPELINE_TASK_MODULES"] = task_modules
        env.update(extra or {})
        return env

    def _spawn(self, name: str, kind: str, argv: Sequence[str], env: dict[str, str]) -> Proc:
        log_path = self.tmp_path / f"{name}.log"
        popen = spawn(
            [sys.executable, "-m", "celery", *argv], log_path=log_path, env=env, append=True
        )
        proc = Proc(name=name, kind=kind, popen=popen, log_path=log_path)
        self.procs.append(proc)
        return proc

    def start_worker(
        self,
        *,
        concurrency: int = 2,
        pool: str = "prefork",
        app: str = "pipeline",
        database_url: str | None = None,
        task_modules: str | None = "tests.support.celery_tasks",
        extra_env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Proc:
        """Start `celery -A <app> worker` on this test's queue; waits until it is ready."""
        name = f"w{len(self.procs) + 1}-{uuid.uuid4().hex[:6]}"
        argv = [
            "-A", app, "worker",
            "--pool", pool, "-c", str(concurrency),
            "-Q", self.queue, "-n", f"{name}@%h",
            "--without-gossip", "--without-mingle",
            "-l", "info",
        ]  # fmt: skip
        env = self.env(database_url=database_url, task_modules=task_modules, extra=extra_env)
        proc = self._spawn(name, "worker", argv, env)
        if wait:
            self.wait_ready(proc)
        return proc

    def start_beat(
        self,
        *,
        interval: float = 1.0,
        waiting_seconds: float | None = None,
        database_url: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> Proc:
        """Start `celery -A pipeline beat`: it sends `pipeline.reap` every `interval` seconds."""
        name = f"beat-{uuid.uuid4().hex[:6]}"
        extra = {"PIPELINE_REAP_INTERVAL": str(interval), **(extra_env or {})}
        if waiting_seconds is not None:
            extra["PIPELINE_REAP_WAITING_SECONDS"] = str(waiting_seconds)
        argv = [
            "-A", "pipeline", "beat",
            "-s", str(self.tmp_path / f"{name}-schedule"),
            "--pidfile", str(self.tmp_path / f"{name}.pid"),
            "-l", "info",
        ]  # fmt: skip
        proc = self._spawn(name, "beat", argv, self.env(database_url=database_url, extra=extra))
        wait_until(
            lambda: "Sending due task pipeline-reap" in proc.log() or not proc.alive(),
            timeout=READY_TIMEOUT,
            what=f"{name} to send its first reap",
        )
        assert proc.alive(), f"{name} exited:\n{proc.log()}"
        return proc

    def wait_ready(self, proc: Proc) -> None:
        marker = f"{proc.name}@"
        wait_until(
            lambda: (
                not proc.alive()
                or any(marker in line and " ready." in line for line in proc.log().splitlines())
            ),
            timeout=READY_TIMEOUT,
            what=f"{proc.name} to be ready",
        )
        assert proc.alive(), f"{proc.name} exited:\n{proc.log()}"

    def worker_of(self, processed_by: str) -> tuple[Proc, int]:
        """The worker and pool pid named by a checkpoint's `processed_by` (`node@host:pid`)."""
        node, _, pid = processed_by.rpartition(":")
        for proc in self.procs:
            if proc.kind == "worker" and node.startswith(f"{proc.name}@"):
                return proc, int(pid)
        raise AssertionError(f"no worker of ours is {processed_by!r}")

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.kill()

    def print_logs(self, tail: int = 200) -> None:
        for proc in self.procs:
            lines = proc.log().splitlines()
            print(f"\n===== {proc.name} ({proc.kind}, pid {proc.pid}) last {tail} lines =====")
            print("\n".join(lines[-tail:]))

    def close(self) -> None:
        self.stop_all()
        self._cleanup_broker()
        if self.redis is not None:
            self.redis.close()
        self.store.close()
        self.engine.dispose()


def rabbitmq_queue_depth(broker_url: str, queue: str) -> int:
    """Ready messages in a RabbitMQ queue (0 when it does not exist)."""
    import kombu

    with kombu.Connection(broker_url) as conn:
        channel = conn.default_channel
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except conn.channel_errors:
            return 0


def drop_queue_keys(client: redis.Redis, queue: str) -> None:
    """Drop a test queue's keys (and queues named after it), and unacked copies routed to it.

    kombu's Redis layout: a list per queue (plus priority lists named after it), binding sets
    `_kombu.binding[_permanent].<queue>`, and the `unacked` hash of [message, exchange,
    routing key] with its `unacked_index`.
    """
    with contextlib.suppress(redis.RedisError):
        for pattern in (f"{queue}*", f"_kombu.binding*{queue}*"):
            for key in list(client.scan_iter(match=pattern)):
                client.delete(key)
        for tag, raw in client.hscan_iter("unacked"):
            with contextlib.suppress(ValueError, TypeError, IndexError):
                if str(json.loads(raw)[2]).startswith(queue):
                    client.hdel("unacked", tag)
                    client.zrem("unacked_index", tag)


@contextlib.contextmanager
def app_on(broker_url: str, queue: str) -> Iterator[Any]:
    """Point `pipeline.app` in this process at `broker_url`, default queue `queue`."""
    app = pipeline.app
    saved = {k: app.conf[k] for k in ("broker_url", "task_default_queue")}

    def reset_pools() -> None:
        # The app's pools were made for the broker URL of their time; kombu keeps one pool per
        # URL in its own registry (closing it would break later users of that URL), so only
        # the app's references are dropped.
        app._pool = None
        app.amqp._producer_pool = None

    reset_pools()
    app.conf.broker_url = broker_url
    app.conf.task_default_queue = queue
    try:
        yield app
    finally:
        reset_pools()
        app.conf.update(saved)


@contextlib.contextmanager
def running_cluster(
    request: pytest.FixtureRequest,
    tmp_path: pathlib.Path,
    database_url: str,
    broker_url: str,
    lease: float = DEFAULT_LEASE,
) -> Iterator[Cluster]:
    """A cluster for one test; its processes are killed and its logs printed on failure."""
    cluster = Cluster(
        tmp_path=tmp_path, database_url=database_url, broker_url=broker_url, lease=lease
    )
    cluster.reset_tables()
    try:
        with app_on(broker_url, cluster.queue):
            yield cluster
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is None or report.failed:
            cluster.print_logs()
        cluster.close()


@pytest.fixture
def make_cluster(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, database_url: str, redis_url: str
) -> Iterator[Callable[..., Cluster]]:
    """Factory: `make_cluster(lease=3, broker_url=None)`; one cluster per test.

    `broker_url`: another broker than the session's Redis database (the RabbitMQ vhost of
    tests/support/brokers.py, or the session's private Redis database for a test that flushes
    its broker).
    """
    with contextlib.ExitStack() as stack:

        def make(
            *,
            lease: float = DEFAULT_LEASE,
            broker_url: str | None = None,
        ) -> Cluster:
            broker = broker_url or redis_url
            return stack.enter_context(
                running_cluster(request, tmp_path, database_url, broker, lease)
            )

        yield make


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    """A cluster with the default lease on the session's Redis db."""
    return make_cluster()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Keep each phase's report on the item, so fixtures know at teardown if the test failed.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
