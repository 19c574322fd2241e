"""A real `celery worker` and a real Flower (started by `pipeline flower`) on a private queue.

Used by tests/acceptance/test_flower.py and by tests/support/screenshot.py (the README's
picture of Flower). Both processes get the env a deployment gives them (PIPELINE_DATABASE_URL,
PIPELINE_BROKER_URL, PIPELINE_QUEUE, FLOWER_BASIC_AUTH) and their own session, so `close()`
kills each whole process group. Flower listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import secrets
import shutil
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import kombu.pools
import redis
import requests
import sqlalchemy as sa

import pipeline
from pipeline.store.postgres import engine_url
from tests.support.celery_tasks import SINK_DDL
from tests.support.processes import REPO, spawn
from tests.support.workers import Proc, wait_until

# Redis database of the screenshot scripts (the tests use their session's private one instead).
FLOWER_REDIS_DB = 12
READY_TIMEOUT = 45.0
FINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED", "REJECTED"})


def pipeline_executable() -> str:
    """The `pipeline` console script of the interpreter running the tests."""
    beside = pathlib.Path(sys.executable).with_name("pipeline")
    if beside.exists():
        return str(beside)
    found = shutil.which("pipeline")
    if found is None:
        raise AssertionError("the `pipeline` command is not installed (pip install -e .)")
    return found


@contextlib.contextmanager
def app_broker(broker_url: str) -> Iterator[Any]:
    """Point `pipeline.app` in this process at `broker_url`; restored afterwards."""
    app = pipeline.app
    saved = app.conf.broker_url

    def reset_pools() -> None:
        # The app's pools are kombu's global ones, keyed by connection: closing one leaves it
        # registered (and a later send fails on a closed pool), so reset the registry too.
        kombu.pools.reset()
        app._pool = None
        app.amqp._producer_pool = None

    reset_pools()
    app.conf.broker_url = broker_url
    try:
        yield app
    finally:
        reset_pools()
        app.conf.broker_url = saved


@dataclasses.dataclass
class FlowerStack:
    """One worker and any number of Flowers on a private queue; see the module docstring."""

    database_url: str
    broker_url: str
    log_dir: pathlib.Path
    user: str = "admin"
    password: str = dataclasses.field(default_factory=lambda: secrets.token_urlsafe(18))
    queue: str = dataclasses.field(default_factory=lambda: f"flower-{uuid.uuid4().hex[:10]}")
    worker_name: str = dataclasses.field(default_factory=lambda: f"fw-{uuid.uuid4().hex[:8]}")
    procs: list[Proc] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.engine = sa.create_engine(
            engine_url(self.database_url), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
        )
        self.redis = redis.Redis.from_url(self.broker_url)

    @property
    def basic_auth(self) -> str:
        return f"{self.user}:{self.password}"

    # -- database ---------------------------------------------------------------------------

    def reset_tables(self) -> None:
        """Create the test sink, then empty it and the checkpoint tables."""
        with self.engine.connect() as conn:
            conn.execute(sa.text(SINK_DDL))
            conn.execute(sa.text("TRUNCATE sink, file_checkpoints, file_attempts CASCADE"))

    def scalar(self, query: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(query), params).scalar()

    # -- processes --------------------------------------------------------------------------

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PIPELINE_", "FLOWER_", "CELERY_"))
        }
        env.update(
            PIPELINE_DATABASE_URL=self.database_url,
            PIPELINE_BROKER_URL=self.broker_url,
            PIPELINE_QUEUE=self.queue,
            PIPELINE_TASK_MODULES="tests.support.celery_tasks",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
            PYTHONUNBUFFERED="1",
        )
        env.update(extra or {})
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        popen = spawn(argv, log_path=log_path, env=env, append=True)
        proc = Proc(name, name.split("-")[0], popen, log_path)
        self.procs.append(proc)
        return proc

    def start_worker(self) -> Proc:
        """`celery -A pipeline worker` on this stack's queue (not waited for; see wait_ready)."""
        argv = [
            sys.executable, "-m", "celery", "-A", "pipeline", "worker",
            "-Q", self.queue, "-n", f"{self.worker_name}@%h",
            "-c", "1", "--without-gossip", "--without-mingle", "-l", "info",
        ]  # fmt: skip
        return self._spawn(self.worker_name, argv, self.env())

    def start_flower(
        self, port: int, *, auth: bool = True, extra_env: dict[str, str] | None = None
    ) -> Proc:
        """`pipeline flower --port PORT`, the password in FLOWER_BASIC_AUTH (never in argv)."""
        extra = {"FLOWER_ADDRESS": "127.0.0.1", **(extra_env or {})}
        argv = [pipeline_executable(), "flower", "--port", str(port)]
        if auth:
            extra["FLOWER_BASIC_AUTH"] = self.basic_auth
        else:
            argv.append("--no-auth")
        return self._spawn(f"flower-{port}", argv, self.env(extra))

    def describe(self) -> str:
        return "\n".join(
            f"===== {p.name} (pid {p.pid}, alive {p.alive()}) =====\n{p.log()[-4000:]}"
            for p in self.procs
        )

    # -- Flower's HTTP API ------------------------------------------------------------------

    def get(
        self, port: int, path: str, *, auth: tuple[str, str] | None = None, **params: Any
    ) -> requests.Response:
        return requests.get(f"http://127.0.0.1:{port}{path}", auth=auth, params=params, timeout=10)

    def api(self, port: int, path: str, **params: Any) -> Any:
        """GET a Flower API path with this stack's credentials; the decoded JSON."""
        response = self.get(port, path, auth=(self.user, self.password), **params)
        response.raise_for_status()
        return response.json()

    def worker_node(self, names: Any) -> str | None:
        """Our worker's node name (`fw-...@host`) among `names`, if there."""
        return next((n for n in names if n.startswith(f"{self.worker_name}@")), None)

    def wait_ready(self, port: int, *, auth: bool = True) -> str:
        """Wait until Flower on `port` answers and has seen our worker's events; its node name.

        `?status=1` lists the workers Flower knows from the event stream, so once ours is there
        Flower's event receiver is connected and will see the tasks we send from now on.
        """
        credentials = (self.user, self.password) if auth else None

        def seen() -> str | None:
            for proc in self.procs:
                if not proc.alive():
                    raise AssertionError(f"{proc.name} exited\n{self.describe()}")
            try:
                response = self.get(port, "/api/workers", auth=credentials, status=1)
            except requests.ConnectionError:
                return None
            if response.status_code != 200:
                return None
            alive = {name for name, up in response.json().items() if up}
            return self.worker_node(alive)

        return str(
            wait_until(
                seen,
                timeout=READY_TIMEOUT,
                what=f"Flower on port {port} to see worker {self.worker_name}",
                describe=self.describe,
            )
        )

    def send(self, file_url: str) -> str:
        """Send tests.sink for `file_url` to this stack's queue; the task id."""
        from tests.support.celery_tasks import sink

        with app_broker(self.broker_url):
            return str(sink.apply_async(args=[file_url], queue=self.queue).id)

    def wait_final(self, port: int, task_ids: list[str], *, timeout: float = 30) -> dict[str, Any]:
        """Poll GET /api/tasks until every task in `task_ids` is in a final state; the tasks."""

        def done() -> dict[str, Any] | None:
            tasks = self.api(port, "/api/tasks")
            mine = {i: tasks[i] for i in task_ids if i in tasks}
            if len(mine) == len(task_ids) and all(
                t["state"] in FINAL_STATES for t in mine.values()
            ):
                return mine
            return None

        result: dict[str, Any] = wait_until(
            done,
            timeout=timeout,
            what=f"tasks {task_ids} to finish in Flower",
            describe=self.describe,
        )
        return result

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        with contextlib.suppress(redis.RedisError):
            for key in list(self.redis.scan_iter(match=f"*{self.queue}*")):
                self.redis.delete(key)
        self.redis.close()
        self.engine.dispose()
