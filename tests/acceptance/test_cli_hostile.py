"""The real CLI against hostile input: clear refusals, no traceback, no secret, bounded memory.

Each command runs as a subprocess of the installed console script, on the session's database
and the test Redis; the module's worker (tests/acceptance/test_cli.py's `world`) consumes
the queue, and `idle_queue` is one nobody consumes, so its length tells what was enqueued.
"""

from __future__ import annotations

import os
import pathlib
import resource
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import redis
import sqlalchemy as sa

from tests.support.cli_helpers import PIPELINE, Result, assert_no_traceback, cli_env, run_cli
from tests.support.workers import Cluster, wait_until

pytestmark = pytest.mark.slow

SECRET = "S3cr#t/pw?x@y"  # a password that urllib would cut short


def _rows(world: Cluster, batch: str) -> list[sa.Row[object]]:
    return world.rows(
        "SELECT file_url, status FROM file_checkpoints WHERE batch_id = :b ORDER BY file_url",
        b=batch,
    )


def _db_url_with_password(database_url: str, password: str) -> str:
    url = sa.make_url(database_url).set(password=password)
    return url.render_as_string(hide_password=False)


# -- secrets ----------------------------------------------------------------------------------


def test_database_password_with_hash_slash_query_at__never_printed(
    database_url: str, redis_url: str
) -> None:
    # Trust authentication accepts any password: the URL works and carries the secret.
    good = cli_env(
        PIPELINE_DATABASE_URL=_db_url_with_password(database_url, SECRET),
        PIPELINE_BROKER_URL=redis_url,
    )
    # Nothing listens on 127.0.0.1:1 (the embedded server's socket folder, in the query's
    # `host`, is dropped too, or it would win over the port).
    unreachable = (
        sa.make_url(database_url).difference_update_query(["host"]).set(host="127.0.0.1", port=1)
    )
    down = cli_env(
        PIPELINE_DATABASE_URL=_db_url_with_password(
            unreachable.render_as_string(hide_password=False), SECRET
        ),
        PIPELINE_BROKER_URL=redis_url,
    )
    for args, environ, code in (
        (("db", "upgrade"), good, 0),
        (("status", "--json"), good, 0),
        (("db", "upgrade"), down, 1),
        (("status",), down, 1),
    ):
        result = run_cli(*args, env=environ)
        assert result.returncode == code, result.describe()
        assert_no_traceback(result)
        for part in ("S3cr", "pw?x", "#t/"):
            assert part not in result.output, result.describe()
    assert ":***@" in run_cli("db", "upgrade", env=good).stdout


def test_broker_password_with_hash__never_printed(database_url: str) -> None:
    environ = cli_env(
        PIPELINE_DATABASE_URL=database_url,
        PIPELINE_BROKER_URL="redis://:Pa55#w0rd@127.0.0.1:1/0",
        PIPELINE_QUEUE=f"nobroker-{uuid.uuid4().hex[:6]}",
    )
    result = run_cli("submit", "/tmp/x.jsonl", env=environ, timeout=60)
    assert result.returncode == 1, result.describe()
    assert_no_traceback(result)
    assert "Pa55" not in result.output, result.describe()
    assert "w0rd" not in result.output, result.describe()


def test_file_urls_with_credentials__refused_saying_storage_options_secret_not_echoed(
    world: Cluster, env: dict[str, str], idle_queue: str
) -> None:
    batch = f"creds-{uuid.uuid4().hex[:6]}"
    given = [
        "ftp://user:Ftp5ecret@host/x.jsonl",
        "s3://AKIAKEY:S3secretKey@bucket/x.jsonl",
        "s3://AKIAKEY:S3se/cretKey@bucket/x.jsonl",
        "webhdfs://u:Hdfs5ecret@namenode/x.jsonl",
        "memory://u:Mem5ecret@x/y.jsonl",
    ]
    result = run_cli("submit", *given, "--batch", batch, env={**env, "PIPELINE_QUEUE": idle_queue})
    assert result.returncode == 1, result.describe()
    assert_no_traceback(result)
    assert result.flat_stderr.count("storage options") == len(given), result.describe()
    for secret in ("Ftp5ecret", "S3secretKey", "cretKey", "Hdfs5ecret", "Mem5ecret", "AKIAKEY"):
        assert secret not in result.output, result.describe()
    assert _rows(world, batch) == []


# -- bounded reads ----------------------------------------------------------------------------


def _limited(cap_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))


def test_submit_from_dev_zero__refused_quickly_within_a_memory_cap(
    env: dict[str, str], idle_queue: str
) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [*PIPELINE, "submit", "--from", "/dev/zero"],
        env={**env, "PIPELINE_QUEUE": idle_queue},
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: _limited(1024 * 2**20),  # 1 GiB of address space, all of it
        check=False,
    )
    result = Result(("submit", "--from", "/dev/zero"), proc.returncode, proc.stdout, proc.stderr)
    assert time.monotonic() - started < 30, result.describe()
    assert result.returncode == 1, result.describe()
    assert_no_traceback(result)
    assert "refused line 1: longer than 2048 characters" in result.flat_stderr, result.describe()
    assert "stopped reading" in result.flat_stderr


def test_input_lines__cr_does_not_split_non_utf8_refused_with_its_line_number(
    world: Cluster, env: dict[str, str], idle_queue: str, tmp_path: pathlib.Path
) -> None:
    batch = f"lines-{uuid.uuid4().hex[:6]}"
    listing = tmp_path / "list.txt"
    listing.write_bytes(
        b"/data/one.jsonl\n"  # line 1
        b"/data/two\r/three.jsonl\n"  # line 2: one line with a CR in it, refused
        b"/data/caf\xe9.jsonl\n"  # line 3: Latin-1, not UTF-8
        b"/data/four.jsonl\r\n"  # line 4: a Windows line ending is only a line ending
        + b"/data/"
        + b"x" * 9000
        + b".jsonl\n"  # line 5: too long
        + b"/data/\xe2\x80\xae.jsonl\n"  # line 6: U+202E
        + b"/data/five.jsonl\n"  # line 7
    )
    result = run_cli(
        "submit", "--from", str(listing), "--batch", batch,
        env={**env, "PIPELINE_QUEUE": idle_queue},
    )  # fmt: skip
    assert result.returncode == 1, result.describe()
    assert_no_traceback(result)
    stderr = result.flat_stderr
    assert "refused line 2: contains a control character (0x0d)" in stderr, result.describe()
    assert "refused line 3: not UTF-8: byte 0xe9" in stderr
    assert "refused line 5: longer than 2048 characters" in stderr
    assert "refused line 6: contains a control character (U+202E)" in stderr
    assert [r.file_url for r in _rows(world, batch)] == [
        "file:///data/five.jsonl",
        "file:///data/four.jsonl",
        "file:///data/one.jsonl",
    ]


def test_stdin_closed_or_not_utf8__clear_message_no_traceback(
    env: dict[str, str], idle_queue: str
) -> None:
    environ = {**env, "PIPELINE_QUEUE": idle_queue}
    closed = subprocess.run(
        " ".join([*PIPELINE, "submit", "-"]) + " <&-",
        shell=True,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert closed.returncode == 1, closed.stderr
    assert "Traceback" not in closed.stderr
    assert "stdin: it is closed" in closed.stderr
    binary = subprocess.run(
        [*PIPELINE, "submit", "-"],
        env=environ,
        input=b"\xff\xfe/x.jsonl\n",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert binary.returncode == 1
    assert b"Traceback" not in binary.stderr
    assert b"refused line 1: not UTF-8: byte 0xff" in binary.stderr


# -- an interrupted submit --------------------------------------------------------------------


# The CLI as `pipeline` runs it, plus a stack dump of every thread on SIGUSR1: a run still up
# 30 s after its SIGINT shows where it is stuck before it is killed.
_WITH_STACK_DUMP = (
    "import faulthandler, signal; faulthandler.register(signal.SIGUSR1, all_threads=True);"
    " from pipeline.cli.main import main; main()"
)


def _cli_dumping_stacks(*args: str) -> list[str]:
    return [sys.executable, "-c", _WITH_STACK_DUMP, *args]


def _stopped_by_sigint(proc: subprocess.Popen[bytes]) -> str:
    """SIGINT now; the process must be gone within 30 s. Returns its stderr, on one line."""
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired as stuck:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        proc.kill()
        _, rest = proc.communicate(timeout=30)
        dump = ((stuck.stderr or b"") + rest).decode(errors="replace")
        pytest.fail(f"still running 30 s after SIGINT; stderr and stacks:\n{dump}")
    return " ".join(stderr.decode().split())


def _submit_wait(env: dict[str, str], queue: str, batch: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        _cli_dumping_stacks("submit", f"/data/{batch}.jsonl", "--batch", batch, "--wait"),
        env={**env, "PIPELINE_QUEUE": queue},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_sigint_during_submit__every_registered_row_has_its_message_resubmit_sends_pending(
    world: Cluster, env: dict[str, str], idle_queue: str
) -> None:
    batch = f"int-{uuid.uuid4().hex[:6]}"
    names = [f"/data/int-{batch}/{i:05d}.jsonl" for i in range(5000)]
    environ = {**env, "PIPELINE_QUEUE": idle_queue}
    proc = subprocess.Popen(
        _cli_dumping_stacks("submit", "-", "--batch", batch, "--no-fingerprint"),
        env=environ,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    # Feed 2,500 lines at once, then wait until a first chunk is registered: the read of the
    # rest blocks on the pipe when the signal comes.
    proc.stdin.write("".join(n + "\n" for n in names[:2500]).encode())
    proc.stdin.flush()
    wait_until(lambda: len(_rows(world, batch)) >= 1000, timeout=30, what="a first chunk")
    text = _stopped_by_sigint(proc)
    assert proc.returncode == 128 + signal.SIGINT, text
    assert "Traceback" not in text
    assert "interrupted by SIGINT" in text
    assert f"batch {batch}:" in text  # the summary
    client = redis.Redis.from_url(world.broker_url)
    registered = len(_rows(world, batch))
    assert 1000 <= registered <= 2500
    assert client.llen(idle_queue) == registered  # no row without its message
    # Every row is still pending (nobody consumes the idle queue): a resubmission of the same
    # lines sends each of them again, and the rest for the first time.
    again = run_cli(
        "submit", "-", "--batch", batch, "--no-fingerprint",
        env=environ, stdin="".join(n + "\n" for n in names),
    )  # fmt: skip
    assert again.returncode == 0, again.describe()
    assert "5000 enqueued" in again.flat_stderr, again.describe()
    assert client.llen(idle_queue) == registered + 5000
    client.delete(idle_queue)


# -- smaller ones -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("status", "--dead", "-1"), 2, "--dead"),
        (("reap", "--waiting-seconds", "nan"), 2, "not a number of seconds"),
        (("reap", "--waiting-seconds", "inf"), 2, "not a number of seconds"),
        (("metrics", "--port", "0"), 2, "--port"),
        (("metrics", "--port", "99999"), 2, "--port"),
        (("metrics", "--port", "x"), 2, "--port"),
        (("submit", "--glob", "nosuchscheme://b/*.jsonl"), 1, "nosuchscheme"),
        (("submit", "/x.jsonl", "--batch", "b" * 4000), 2, "batch name too long"),
        (("submit", "/x.jsonl", "--task", "t" * 4000), 2, "task name too long"),
        (("submit", "/x.jsonl", "--batch", "a\u202eb"), 2, "control character"),
    ],
)
def test_bad_arguments__clear_message_and_exit_status_no_traceback(
    env: dict[str, str], idle_queue: str, args: tuple[str, ...], code: int, says: str
) -> None:
    result = run_cli(*args, env={**env, "PIPELINE_QUEUE": idle_queue}, timeout=60)
    assert result.returncode == code, result.describe()
    assert_no_traceback(result)
    assert says in result.flat_stderr, result.describe()


def test_metrics_port_taken__clear_error_no_traceback(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("metrics", "--addr", "127.0.0.1", "--port", str(port), env=env)
    assert result.returncode == 1, result.describe()
    assert_no_traceback(result)
    assert f"cannot listen on 127.0.0.1:{port}" in result.flat_stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PIPELINE_DATABASE_URL", "postgresql://u:Pa55w0rd@host:notaport/db"),
        ("PIPELINE_DATABASE_URL", "postgresql://u:Pa55w0rd@[::1/db"),
        ("PIPELINE_DATABASE_URL", "not a url Pa55w0rd"),
        ("PIPELINE_BROKER_URL", "redis://:Pa55w0rd@host:notaport/0"),
        ("PIPELINE_BROKER_URL", "nosuchtransport://u:Pa55w0rd@host/"),
    ],
)
def test_malformed_database_or_broker_url__clear_error_no_traceback_no_password(
    env: dict[str, str], variable: str, value: str
) -> None:
    result = run_cli("submit", "/x.jsonl", env={**env, variable: value}, timeout=60)
    assert result.returncode in (1, 2), result.describe()
    assert_no_traceback(result)
    assert "Pa55w0rd" not in result.output, result.describe()
    assert "invalid" in result.flat_stderr.lower() or "unreachable" in result.flat_stderr


def test_task_no_worker_has__warned_at_submit(env: dict[str, str], idle_queue: str) -> None:
    result = run_cli(
        "submit", f"/data/{uuid.uuid4().hex}.jsonl", "--task", "no.such.task",
        env={**env, "PIPELINE_QUEUE": idle_queue},
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    assert "has task 'no.such.task'" in result.flat_stderr, result.describe()
    assert "stay pending" in result.flat_stderr


@pytest.mark.parametrize("auth", ["admin:", ":pw", "admin", "a:b,c:"])
def test_flower_empty_user_or_password__refused(env: dict[str, str], auth: str) -> None:
    result = run_cli("flower", env={**env, "FLOWER_BASIC_AUTH": auth}, timeout=30)
    assert result.returncode == 2, result.describe()
    assert "neither empty" in result.flat_stderr
    assert os.environ.get("FLOWER_BASIC_AUTH") != auth


def test_sigint_while_following_with_wait__stops_following_without_traceback(
    world: Cluster, env: dict[str, str], idle_queue: str
) -> None:
    batch = f"follow-{uuid.uuid4().hex[:6]}"
    proc = _submit_wait(env, idle_queue, batch)
    wait_until(lambda: len(_rows(world, batch)) == 1, timeout=30, what="the row registered")
    time.sleep(1.0)  # past the summary, into the progress bar
    text = _stopped_by_sigint(proc)
    assert proc.returncode == 128 + signal.SIGINT, text
    assert "Traceback" not in text
    assert "stopped following" in text


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.1, 0.2, 0.35])
def test_sigint_between_submit_and_following__exits_130_at_once(
    world: Cluster, env: dict[str, str], idle_queue: str, delay: float
) -> None:
    """Ctrl-C just after the row is registered lands in the message's send, the submit bar's
    closing, the summary or the follow bar's start: wherever, the command ends at once. (A
    KeyboardInterrupt raised inside rich's refresh lock once left it hung: CI, 2026-12-02.)"""
    batch = f"race-{uuid.uuid4().hex[:6]}"
    proc = _submit_wait(env, idle_queue, batch)
    wait_until(
        lambda: len(_rows(world, batch)) == 1,
        timeout=30,
        what="the row registered",
        interval=0.005,
    )
    time.sleep(delay)
    text = _stopped_by_sigint(proc)
    assert proc.returncode == 128 + signal.SIGINT, text
    assert "Traceback" not in text
    assert "stopped following" in text or "interrupted by SIGINT" in text, text


def test_status__a_legacy_row_with_credentials_is_shown_masked(
    world: Cluster, env: dict[str, str]
) -> None:
    from pipeline.models import Claim

    batch = f"legacy-{uuid.uuid4().hex[:6]}"
    url = f"ftp://user:Legacy5ecret@host/{batch}.jsonl"  # registered before refusals existed
    world.store.register([url], batch_id=batch)
    claim = world.store.claim(url, "w", 30)
    assert isinstance(claim, Claim)
    world.store.fail(url, claim.token, f"could not open {url}", retryable=False)
    for args in (("status", "--batch", batch), ("status", "--batch", batch, "--json")):
        result = run_cli(*args, env=env)
        assert result.returncode == 0, result.describe()
        assert "Legacy5ecret" not in result.output, result.describe()
        assert "ftp://user:***@host" in result.output, result.describe()
