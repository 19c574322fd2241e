"""The real `pipeline` command line against a real worker, Postgres and Redis.

Every command runs as a subprocess of the installed console script. One `celery worker`
subprocess serves the whole module on its own queue; each test uses its own files (so its
own URLs) and batch name, and reads the tables to check what the command said.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from pipeline.cli import local
from pipeline.models import Status
from pipeline.reference import sample
from tests.support.cli_helpers import (
    Result,
    assert_no_traceback,
    cli_env,
    processes_of,
    run_cli,
)
from tests.support.workers import Cluster, wait_until

PASSWORD = "s3cretpw"
WAIT = "90"  # seconds `submit --wait` may follow a batch before giving up
STATUSES = tuple(s.value for s in Status)


# -- fixtures ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Batch:
    """A sample batch submitted with `--wait`: its folder, glob, name and the submit run."""

    folder: pathlib.Path
    pattern: str
    name: str
    paths: list[pathlib.Path]
    result: Result

    @property
    def poison(self) -> pathlib.Path:
        (path,) = [p for p in self.paths if "poison" in p.name]
        return path

    @property
    def good(self) -> list[pathlib.Path]:
        return [p for p in self.paths if "poison" not in p.name]


def submit_sample(
    env: dict[str, str], folder: pathlib.Path, n_files: int, lines: int, seed: int, **kw: Any
) -> Batch:
    paths = sample.make_batch(folder, n_files=n_files, lines_per_file=lines, seed=seed, **kw)
    name = f"b-{uuid.uuid4().hex[:8]}"
    pattern = f"{folder}/*"
    result = run_cli(
        "submit", "--glob", pattern, "--batch", name, "--wait", "--timeout", WAIT, env=env
    )
    assert_no_traceback(result)
    return Batch(folder, pattern, name, paths, result)


@pytest.fixture(scope="module")
def b1(world: Cluster) -> Batch:
    """The 12-file sample (one poison file) submitted by glob and followed to the end."""
    return submit_sample(
        cli_env(world.env(task_modules=None)), world.tmp_path / "b1" / "data", 12, 20, seed=1
    )


# -- helpers ----------------------------------------------------------------------------------


def url(path: pathlib.Path) -> str:
    return path.absolute().as_uri()


def counts(world: Cluster, batch: str) -> dict[str, int]:
    rows = world.rows(
        "SELECT status, count(*) AS n FROM file_checkpoints WHERE batch_id = :b GROUP BY status",
        b=batch,
    )
    return {r.status: int(r.n) for r in rows}


def events_of(world: Cluster, prefix: str) -> list[sa.Row[Any]]:
    return world.rows(
        "SELECT file_url, line, event_id FROM events"
        " WHERE left(file_url, length(:p)) = :p ORDER BY file_url, line",
        p=prefix,
    )


def expected_events(path: pathlib.Path, lines: int, every: int = 10) -> set[tuple[str, int, str]]:
    """(file_url, physical line, event id) of the valid records `sample` wrote to `path`."""
    index = int(path.name.split("-")[1].split(".")[0])
    header = 1 if path.name.endswith(".csv") else 0
    return {
        (url(path), row + header, f"evt-{index:04d}-{row:06d}")
        for row in range(1, lines + 1)
        if row % every
    }


def write_jsonl(path: pathlib.Path, ids: list[str]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": i, "ts": "2024-05-01T12:00:00Z", "type": "click", "n": n} for n, i in enumerate(ids)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def with_password(database_url: str, **changes: Any) -> str:
    url = sa.make_url(database_url).set(password=PASSWORD, **changes)
    if "port" in changes:
        # Another address: on TCP, even where the server is a unix socket (the embedded one).
        url = url.set(host="127.0.0.1").difference_update_query(["host"])
    return url.render_as_string(hide_password=False)


# -- submit -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_submit_glob_wait__valid_records_land_and_the_poison_file_is_dead(
    world: Cluster, b1: Batch, env: dict[str, str]
) -> None:
    result = b1.result
    assert result.returncode == 1, result.describe()  # one file ended dead
    assert "12 files, 12 enqueued" in result.flat_stderr, result.describe()
    assert counts(world, b1.name) == {"completed": 11, "dead": 1}

    # Exactly the valid records, once each: every 10th sample line is malformed.
    expected = set().union(*(expected_events(p, 20) for p in b1.good))
    got = [tuple(r) for r in events_of(world, url(b1.folder) + "/")]
    assert len(got) == len(set(got)) == 11 * 18
    assert set(got) == expected

    dead = world.checkpoint(url(b1.poison))
    assert dead is not None
    assert (dead.status, dead.attempt) == ("dead", 1)
    assert "binary content (NUL byte) on line 1" in dead.error_message
    attempts = world.attempts(url(b1.poison))
    assert [(a.outcome, a.error_class) for a in attempts] == [("failed", "BadContent")]

    for path in b1.good:
        row = world.checkpoint(url(path))
        assert row is not None
        assert (row.status, row.records_total, row.records_filtered, row.records_persisted) == (
            "completed",
            20,
            2,
            18,
        ), path.name
        problems = row.details["problems"]
        first = 11 if path.name.endswith(".csv") else 10
        assert len(problems) == 2
        assert problems[0].startswith(f"line {first}: "), problems


@pytest.mark.slow
def test_resubmit_same_glob__enqueues_nothing(
    world: Cluster, b1: Batch, env: dict[str, str], idle_queue: str
) -> None:
    before = world.scalar("SELECT count(*) FROM file_attempts")
    quiet = {**env, "PIPELINE_QUEUE": idle_queue}

    again = run_cli("submit", "--glob", b1.pattern, "--batch", b1.name, env=quiet)
    # The batch holds a file known to have ended dead: non-zero even without --wait.
    assert again.returncode == 1, again.describe()
    assert (
        "12 files, 0 enqueued, 11 already completed, 1 already dead, 0 already in flight, "
        "0 refused" in again.flat_stderr
    ), again.describe()

    waited = run_cli("submit", "--glob", b1.pattern, "--batch", b1.name, "--wait", env=quiet)
    assert waited.returncode == 1, waited.describe()  # the batch still holds a dead file
    assert "0 enqueued" in waited.flat_stderr, waited.describe()

    assert world.redis.llen(idle_queue) == 0
    assert world.scalar("SELECT count(*) FROM file_attempts") == before
    assert (
        world.scalar("SELECT max(generation) FROM file_checkpoints WHERE batch_id = :b", b=b1.name)
        == 1
    )
    assert counts(world, b1.name) == {"completed": 11, "dead": 1}


@pytest.mark.slow
def test_changed_file__resubmit_starts_a_new_generation_for_that_file_only(
    world: Cluster, env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    batch = submit_sample(env, tmp_path / "data", 3, 6, seed=3, poison=False)
    assert batch.result.returncode == 0, batch.result.describe()
    changed = batch.paths[0]
    assert changed.name.endswith(".jsonl")
    stat = changed.stat()
    write_jsonl(changed, ["new-1", "new-2", "new-3", "new-4"])
    os.utime(changed, (stat.st_atime + 10, stat.st_mtime + 10))

    again = run_cli(
        "submit", "--glob", batch.pattern, "--batch", batch.name, "--wait", "--timeout", WAIT,
        env=env,
    )  # fmt: skip
    assert again.returncode == 0, again.describe()
    assert "3 files, 1 enqueued, 2 already completed" in again.flat_stderr, again.describe()

    generations = {
        r.file_url: (r.generation, r.status)
        for r in world.rows(
            "SELECT file_url, generation, status FROM file_checkpoints WHERE batch_id = :b",
            b=batch.name,
        )
    }
    assert generations == {
        url(changed): (2, "completed"),
        url(batch.paths[1]): (1, "completed"),
        url(batch.paths[2]): (1, "completed"),
    }
    row = world.checkpoint(url(changed))
    assert (row.records_total, row.records_persisted) == (4, 4)
    # The events are the file's new content, not a mix of the old and the new.
    assert [r.event_id for r in events_of(world, url(changed))] == [
        "new-1",
        "new-2",
        "new-3",
        "new-4",
    ]


@pytest.mark.slow
def test_submit_from_file__refused_lines_reported_with_numbers_good_ones_processed(
    world: Cluster, env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    good1 = write_jsonl(tmp_path / "in" / "good1.jsonl", ["g1-1", "g1-2", "g1-3"])
    good2 = write_jsonl(tmp_path / "in" / "good2.jsonl", ["g2-1", "g2-2"])
    listing = tmp_path / "urls.txt"
    listing.write_text(
        "\n".join(
            [
                str(good1),  # 1
                "",  # 2
                f"{tmp_path}/bad\x01name.jsonl",  # 3
                "/" + "a" * 2100 + ".jsonl",  # 4
                "nosuch://x",  # 5
                "   ",  # 6
                url(good2),  # 7
                "nosuch://a/[/b]",  # 8: rich would read "[/b]" as markup
                "nosuch://[/x]",  # 9: urlsplit raises ValueError on this host
            ]
        )
        + "\n"
    )
    batch = f"[/from]-{uuid.uuid4().hex[:6]}"  # markup-like, printed in several places
    result = run_cli(
        "submit", "--from", str(listing), "--batch", batch, "--wait", "--timeout", WAIT, env=env
    )
    assert_no_traceback(result)
    assert result.returncode == 1, result.describe()
    err = result.flat_stderr
    for expected in (
        "refused line 2: empty line",
        "refused line 3: contains a control character (0x01)",
        "refused line 4: longer than 2048 characters",
        "refused line 5: no fsspec filesystem serves scheme 'nosuch'",
        "refused line 6: empty line",
        "refused line 8: no fsspec filesystem serves scheme 'nosuch': 'nosuch://a/[/b]'",
        "refused line 9: not a valid URL (Invalid IPv6 URL): 'nosuch://[/x]'",
        f"batch {batch}: 2 files, 2 enqueued",
        "7 refused",
    ):
        assert expected in err, result.describe()
    assert not re.search(r"refused line [17]\b", err), result.describe()
    assert counts(world, batch) == {"completed": 2}
    assert (
        world.scalar(
            "SELECT count(*) FROM file_checkpoints WHERE batch_id = :b AND file_url = ANY(:u)",
            b=batch,
            u=[url(good1), url(good2)],
        )
        == 2
    )
    assert len(events_of(world, url(tmp_path / "in") + "/")) == 5
    status = run_cli("status", "--batch", batch, env=env)
    assert status.returncode == 0, status.describe()
    assert f"batch {batch}" in status.stdout


@pytest.mark.slow
def test_submit_from_stdin(world: Cluster, env: dict[str, str], tmp_path: pathlib.Path) -> None:
    path = write_jsonl(tmp_path / "stdin.jsonl", ["s-1", "s-2"])
    batch = f"stdin-{uuid.uuid4().hex[:6]}"
    result = run_cli(
        "submit", "-", "--batch", batch, "--wait", "--timeout", WAIT,
        env=env, stdin=f"{path}\n",
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    assert "1 files, 1 enqueued" in result.flat_stderr
    assert world.checkpoint(url(path)).status == "completed"
    assert [r.event_id for r in events_of(world, url(path))] == ["s-1", "s-2"]


@pytest.mark.slow
def test_three_spellings_of_one_file__one_row_one_execution(
    world: Cluster, env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    path = write_jsonl(tmp_path / "data" / "a b.jsonl", ["sp-1", "sp-2"])
    canonical = path.as_uri()
    assert canonical.endswith("/data/a%20b.jsonl")
    batch = f"spell-{uuid.uuid4().hex[:6]}"
    result = run_cli(
        "submit", "data/a b.jsonl", str(path), canonical,
        "--batch", batch, "--wait", "--timeout", WAIT,
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    assert "1 enqueued" in result.flat_stderr, result.describe()
    rows = world.rows("SELECT file_url, status FROM file_checkpoints WHERE batch_id = :b", b=batch)
    assert [(r.file_url, r.status) for r in rows] == [(canonical, "completed")]
    assert len(world.attempts(canonical)) == 1
    assert len(events_of(world, canonical)) == 2


def test_submit_without_urls__usage_error(database_url: str, redis_url: str) -> None:
    env = cli_env(PIPELINE_DATABASE_URL=database_url, PIPELINE_BROKER_URL=redis_url)
    result = run_cli("submit", "--batch", "nothing", env=env)
    assert result.returncode == 2, result.describe()
    assert "Usage:" in result.stderr
    assert "give URLs" in result.stderr
    assert_no_traceback(result)


# -- status -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_status_json__counts_match_the_table(
    world: Cluster, b1: Batch, env: dict[str, str]
) -> None:
    result = run_cli("status", "--json", "--batch", b1.name, env=env)
    assert result.returncode == 0, result.describe()
    data = json.loads(result.stdout)
    table = counts(world, b1.name)
    assert data["counts"] == {s: table.get(s, 0) for s in STATUSES}
    assert data["batches"] == {b1.name: table}
    assert [d["file_url"] for d in data["dead"]] == [url(b1.poison)]
    assert "binary content (NUL byte)" in data["dead"][0]["error"]
    assert data["dead"][0]["attempts"] == 1
    assert data["records"] == {"total": 11 * 20, "filtered": 11 * 2, "persisted": 11 * 18}

    # Across every batch too (each earlier test has finished, so the table is still).
    everything = json.loads(run_cli("status", "--json", env=env).stdout)
    whole = {r.status: int(r.n) for r in world.rows(
        "SELECT status, count(*) AS n FROM file_checkpoints GROUP BY status"
    )}  # fmt: skip
    assert everything["counts"] == {s: whole.get(s, 0) for s in STATUSES}
    assert everything["records"] is None  # record totals are per batch


@pytest.mark.slow
def test_status_human__shows_the_counts_and_the_dead_file(
    world: Cluster, b1: Batch, env: dict[str, str]
) -> None:
    result = run_cli("status", "--batch", b1.name, env=env)
    assert result.returncode == 0, result.describe()
    out = result.stdout
    cells = r"\s*│\s*".join(["0", "0", "11", "0", "1"])
    assert re.search(rf"{re.escape(b1.name)}\s*│\s*{cells}\s*│", out), out
    assert "latest dead files" in out
    assert url(b1.poison) in out
    assert "binary content (NUL byte) on line 1" in out
    assert "records: 220 read, 22 filtered, 198 persisted" in out


# -- requeue / reap ---------------------------------------------------------------------------


@pytest.mark.slow
def test_requeue_dead__poison_file_runs_in_a_new_generation_and_ends_dead_again(
    world: Cluster, env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    batch = submit_sample(env, tmp_path / "data", 3, 5, seed=2)
    assert batch.result.returncode == 1, batch.result.describe()
    poison = url(batch.poison)
    assert world.checkpoint(poison).status == "dead"

    result = run_cli("requeue", "--dead", "--batch", batch.name, env=env)
    assert result.returncode == 0, result.describe()
    assert "requeued 1 files, enqueued 1" in result.stdout

    world.wait_sql(
        "SELECT generation = 2 AND status = 'dead' FROM file_checkpoints WHERE file_url = :u",
        timeout=30,
        what="the poison file dead again in generation 2",
        u=poison,
    )
    row = world.checkpoint(poison)
    assert row.attempt == 1  # not retried: the error is permanent
    assert "binary content" in row.error_message
    assert [a.outcome for a in world.attempts(poison)] == ["failed", "failed"]
    others = world.rows(
        "SELECT generation, status FROM file_checkpoints WHERE batch_id = :b AND file_url <> :u",
        b=batch.name,
        u=poison,
    )
    assert [(r.generation, r.status) for r in others] == [(1, "completed")] * 2


@pytest.mark.slow
def test_requeue_force__completed_file_runs_again_without_doubling_events(
    world: Cluster, env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    batch = submit_sample(env, tmp_path / "data", 2, 5, seed=4, poison=False)
    assert batch.result.returncode == 0, batch.result.describe()
    target, other = batch.paths
    before = [tuple(r) for r in events_of(world, url(target))]
    assert len(before) == 5  # five lines, none malformed (every 10th is)

    # A plain path, normalised like submit does.
    result = run_cli("requeue", "--force", "--url", str(target), env=env)
    assert result.returncode == 0, result.describe()
    assert "requeued 1 files, enqueued 1" in result.stdout

    world.wait_sql(
        "SELECT generation = 2 AND status = 'completed' FROM file_checkpoints WHERE file_url = :u",
        timeout=30,
        what="the file completed again in generation 2",
        u=url(target),
    )
    assert [a.outcome for a in world.attempts(url(target))] == ["completed", "completed"]
    assert [tuple(r) for r in events_of(world, url(target))] == before
    assert world.checkpoint(url(other)).generation == 1


@pytest.mark.slow
def test_reap__hands_back_a_file_whose_message_was_lost(
    world: Cluster, env: dict[str, str], tmp_path: pathlib.Path, idle_queue: str
) -> None:
    path = write_jsonl(tmp_path / "lost.jsonl", ["l-1"])
    sent = run_cli("submit", str(path), env={**env, "PIPELINE_QUEUE": idle_queue})
    assert sent.returncode == 0, sent.describe()
    assert world.redis.llen(idle_queue) == 1
    world.redis.delete(idle_queue)  # the broker lost the message
    assert world.checkpoint(url(path)).status == "pending"

    result = run_cli("reap", "--waiting-seconds", "0", env=env)
    assert result.returncode == 0, result.describe()
    # Every other row of the module has ended, so this file is the only one handed back.
    assert "reaped 1 files: 1 re-enqueued, 0 dead" in result.stdout, result.describe()
    world.wait_status(url(path), "completed", timeout=30)

    idle = run_cli("reap", env=env)
    assert idle.returncode == 0, idle.describe()
    assert "reaped 0 files: 0 re-enqueued, 0 dead" in idle.stdout, idle.describe()


# -- secrets and outages ----------------------------------------------------------------------


def test_password_in_database_url__never_printed(database_url: str, redis_url: str) -> None:
    # Trust authentication accepts any password, so this URL works and carries a secret.
    env = cli_env(PIPELINE_DATABASE_URL=with_password(database_url), PIPELINE_BROKER_URL=redis_url)
    for args in (("status",), ("status", "--json"), ("db", "upgrade")):
        result = run_cli(*args, env=env)
        assert result.returncode == 0, result.describe()
        assert PASSWORD not in result.output, result.describe()
    upgrade = run_cli("db", "upgrade", env=env)
    assert "is up to date" in upgrade.stdout
    assert ":***@" in upgrade.stdout


def test_database_unreachable__clear_error_without_traceback_or_password(
    database_url: str, redis_url: str
) -> None:
    env = cli_env(
        PIPELINE_DATABASE_URL=with_password(database_url, port=1), PIPELINE_BROKER_URL=redis_url
    )
    for args in (("status",), ("db", "upgrade")):
        result = run_cli(*args, env=env)
        assert result.returncode == 1, result.describe()
        assert_no_traceback(result)
        assert PASSWORD not in result.output, result.describe()
        assert "checkpoint database" in result.flat_stderr
        assert "unreachable" in result.flat_stderr
        assert ":***@127.0.0.1:1/" in result.flat_stderr


def test_broker_down__submit_fails_fast_and_registers_nothing(
    database_url: str, redis_url: str, tmp_path: pathlib.Path
) -> None:
    path = write_jsonl(tmp_path / "nobroker.jsonl", ["n-1"])
    env = cli_env(
        PIPELINE_DATABASE_URL=database_url,
        PIPELINE_BROKER_URL=f"redis://:{PASSWORD}@127.0.0.1:1/0",
        PIPELINE_QUEUE=f"nobroker-{uuid.uuid4().hex[:6]}",
    )
    started = time.monotonic()
    result = run_cli("submit", str(path), env=env, timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode == 1, result.describe()
    assert_no_traceback(result)
    assert PASSWORD not in result.output
    assert "broker redis://:***@127.0.0.1:1/0 unreachable" in result.flat_stderr, result.describe()
    engine = sa.create_engine(database_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                sa.text("SELECT count(*) FROM file_checkpoints WHERE file_url = :u"),
                {"u": url(path)},
            ).scalar()
    finally:
        engine.dispose()
    assert found == 0  # checked before registering: no row is left waiting for the reaper


def test_broker_down__requeue_reports_the_broker_without_traceback(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    import pipeline

    file_url = url(tmp_path / "dead.jsonl")
    batch = f"nobroker-{uuid.uuid4().hex[:6]}"
    store = pipeline.open_store(database_url)
    try:
        store.register([file_url], batch_id=batch, task_name="pipeline.ingest")
        claim = store.claim(file_url, "test", 30)
        assert claim
        store.fail(file_url, claim.token, "broken", retryable=False)
        env = cli_env(
            PIPELINE_DATABASE_URL=database_url,
            PIPELINE_BROKER_URL=f"redis://:{PASSWORD}@127.0.0.1:1/0",
            PIPELINE_QUEUE=batch,
        )
        result = run_cli("requeue", "--dead", "--batch", batch, env=env, timeout=60)
        assert result.returncode == 1, result.describe()
        assert_no_traceback(result)
        assert PASSWORD not in result.output
        assert "broker redis://:***@127.0.0.1:1/0" in result.flat_stderr, result.describe()
        # The broker is asked first, as submit does: nothing moved, the file is still dead.
        assert store.get(file_url).status == "dead"
    finally:
        store.close()


# -- the embedded demo ------------------------------------------------------------------------


def _kill_leftovers(state_dir: pathlib.Path) -> None:
    """SIGKILL processes this test started (they carry its state folder in their env)."""
    for line in processes_of(state_dir):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(line.split()[0]), signal.SIGKILL)


@pytest.fixture
def demo_folder() -> Iterator[pathlib.Path]:
    """A folder for the demo, outside pytest's temporary tree.

    The embedded Postgres runs as its own system user, which must traverse every parent of
    its data folder; a pytest session starting meanwhile (any other run on this machine)
    resets /tmp/pytest-of-<user> to 0700, and the server then fails to start.
    """
    folder = pathlib.Path(tempfile.mkdtemp(prefix="pipeline-demo-"))
    yield folder
    _kill_leftovers(folder)
    shutil.rmtree(folder, ignore_errors=True)


def closing_command(result: Result, needle: str) -> str:
    """The closing line of a demo run that holds `needle`, as a shell command."""
    lines = [line.strip() for line in result.stdout.splitlines() if needle in line]
    assert lines, f"no closing line with {needle!r}\n{result.describe()}"
    return lines[0]


def run_as_printed(command: str, cwd: pathlib.Path, timeout: float = 60) -> Result:
    """Run a printed command line through the shell, in an env without PIPELINE_ variables."""
    proc = subprocess.run(
        ["bash", "-c", command],
        env=cli_env(),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Result((command,), proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.slow
def test_demo__runs_on_private_servers_then_has_nothing_to_do_and_leaves_nothing_running(
    demo_folder: pathlib.Path,
) -> None:
    tmp_path = demo_folder
    state = tmp_path / ".pipeline"
    env = cli_env(PIPELINE_STATE_DIR=str(state))
    assert not any(k in env for k in ("PIPELINE_DATABASE_URL", "PIPELINE_BROKER_URL"))
    first = run_cli("demo", "--files", "30", env=env, cwd=tmp_path, timeout=110)
    assert first.returncode == 0, first.describe()
    assert_no_traceback(first)
    cells = r"\s*│\s*".join(["0", "0", "29", "0", "1"])
    assert re.search(rf"demo\s*│\s*{cells}\s*│", first.stdout), first.describe()
    assert "30 files, 30 enqueued" in first.flat_stderr
    assert "latest dead files" in first.stdout
    # The private Redis is a plain redis:// URL on loopback, its password masked.
    broker = re.search(r"redis://:\*\*\*@127\.0\.0\.1:(\d+)/0", first.flat_stderr)
    assert broker is not None, first.flat_stderr
    # A finished batch: its own rate, not the last minute's.
    assert re.search(
        r"throughput: 30 files in [\d.]+s \([\d.]+ files/s, [\d,]+ records/s\)", first.stdout
    ), first.describe()
    assert "in the last minute" not in first.stdout
    # The bar's final frame: the wait's rate and the time left.
    assert re.search(r"30/30 .*\d+\.\d files/s, eta 0:00", first.flat_stderr), first.stderr

    second = run_cli("demo", "--files", "30", env=env, cwd=tmp_path, timeout=60)
    assert second.returncode == 0, second.describe()
    assert "nothing to do" in second.stdout, second.describe()
    assert "30 files, 0 enqueued, 29 already completed, 1 already dead" in second.flat_stderr
    again = re.search(r"redis://:\*\*\*@127\.0\.0\.1:(\d+)/0", second.flat_stderr)
    assert again is not None, second.flat_stderr

    # The private servers and workers stop with the command (a moment after, for the
    # servers' own shutdown); nothing may keep running, nothing listens on the ports.
    wait_until(
        lambda: not processes_of(state),
        timeout=30,
        what="the demo's processes to end",
        describe=lambda: "\n".join(processes_of(state)),
    )
    for port in {int(broker.group(1)), int(again.group(1))}:
        assert not local.port_open("127.0.0.1", port), f"something still listens on {port}"


@pytest.mark.slow
def test_demo__closing_lines_are_commands_that_work_as_printed(demo_folder: pathlib.Path) -> None:
    state = demo_folder / "state"
    env = cli_env(PIPELINE_STATE_DIR=str(state))
    ran = run_cli("demo", "--files", "12", env=env, cwd=demo_folder, timeout=110)
    assert ran.returncode == 0, ran.describe()
    elsewhere = demo_folder / "elsewhere"
    elsewhere.mkdir()

    status = run_as_printed(closing_command(ran, " status --batch demo"), elsewhere)
    assert status.returncode == 0, status.describe()
    cells = r"\s*│\s*".join(["0", "0", "11", "0", "1"])
    assert re.search(rf"demo\s*│\s*{cells}\s*│", status.stdout), status.describe()
    assert "files/s" in status.stdout, status.describe()

    shell = run_as_printed(closing_command(ran, " db shell -c "), elsewhere)
    assert shell.returncode == 0, shell.describe()
    assert "events" in closing_command(ran, " db shell -c ")
    counts = dict(re.findall(r"^\s*(\w+)\s*\|\s*(\d+)\s*$", shell.stdout, re.M))
    assert set(counts) == {"view", "signup", "purchase", "click"}, shell.describe()
    assert sum(int(n) for n in counts.values()) == int(
        re.search(r"records: \d+ read, \d+ filtered, (\d+) persisted", ran.stdout).group(1)  # type: ignore[union-attr]
    )
    flower = closing_command(ran, " demo --flower ")
    assert flower.startswith("PIPELINE_STATE_DIR=$(mktemp -d) "), flower
    # (demo --flower as printed runs in test_signals.py, on a free port.)
    wait_until(
        lambda: not processes_of(state),
        timeout=30,
        what="the commands' processes to end",
        describe=lambda: "\n".join(processes_of(state)),
    )


def test_private_servers_cannot_start__clear_error_without_traceback(
    tmp_path: pathlib.Path,
) -> None:
    state = tmp_path / "state"
    state.write_text("a file where the state folder should be")
    env = cli_env(PIPELINE_STATE_DIR=str(state))

    result = run_cli("status", env=env, cwd=tmp_path)

    assert result.returncode == 1, result.describe()
    assert_no_traceback(result)
    assert f"could not start the private servers under {state}" in result.flat_stderr


def test_submit_concurrency__sends_a_window_and_status_shows_the_held_files(
    world: Cluster, env: dict[str, str], tmp_path: pathlib.Path, idle_queue: str
) -> None:
    """`submit --concurrency 2` of 10 files sends 4 messages (twice the limit) and holds the
    other 6, and says so; `status --batch` (human and JSON) shows them held."""
    paths = [write_jsonl(tmp_path / f"h{i}.jsonl", [f"h-{i}"]) for i in range(10)]
    batch = f"held-{uuid.uuid4().hex[:6]}"
    quiet = {**env, "PIPELINE_QUEUE": idle_queue}
    sent = run_cli(
        "submit", *map(str, paths), "--batch", batch, "--concurrency", "2", env=quiet
    )  # fmt: skip
    assert sent.returncode == 0, sent.describe()
    assert "10 files, 4 enqueued" in sent.flat_stderr, sent.describe()
    assert "6 files held by the batch's limit" in sent.flat_stderr, sent.describe()
    assert world.redis.llen(idle_queue) == 4
    human = run_cli("status", "--batch", batch, env=env)
    assert human.returncode == 0, human.describe()
    assert "at most 2 running (6 held)" in human.stdout, human.describe()
    shown = run_cli("status", "--batch", batch, "--json", env=env)
    assert shown.returncode == 0, shown.describe()
    assert json.loads(shown.stdout)["batch"]["held"] == 6, shown.stdout
