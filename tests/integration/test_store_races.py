"""Races between separate processes, each with its own store and connections.

Threads in one process would share a connection pool and the GIL; these are real
competitors: spawned processes that open their own `pipeline.open_store(url)` and are released
together by a barrier.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import random
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

import pipeline
from pipeline import errors
from pipeline.models import Claim, Outcome, Refusal, Stats, Status
from pipeline.store import postgres
from pipeline.store.postgres import PostgresStore

SPAWN = multiprocessing.get_context("spawn")
RACERS = 8
FILES = 500
LEASE = 600.0
# Generous: spawned interpreters import the package before they reach the barrier.
BARRIER_TIMEOUT = 90.0
RESULT_TIMEOUT = 100.0


def _race(
    target: Callable[..., Any], jobs: list[tuple[Any, ...]], barrier_parties: int | None = None
) -> list[Any]:
    """Run target(*job, barrier, results) in one spawned process per job; their results."""
    barrier = SPAWN.Barrier(barrier_parties or len(jobs), timeout=BARRIER_TIMEOUT)
    results = SPAWN.Queue()
    procs = [SPAWN.Process(target=target, args=(*job, barrier, results)) for job in jobs]
    for p in procs:
        p.start()
    collected = []
    try:
        for _ in procs:
            collected.append(results.get(timeout=RESULT_TIMEOUT))
    except queue_module.Empty:
        pytest.fail(f"a racer did not report; exit codes {[p.exitcode for p in procs]}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():  # pragma: no cover - only when a racer hangs
                p.kill()
    failures = [r for r in collected if isinstance(r, str)]
    assert not failures, failures
    return collected


# -- 8 processes claim the same 500 files -----------------------------------------------------


def _claimer(database_url: str, worker: str, urls: list[str], barrier: Any, results: Any) -> None:
    try:
        store = pipeline.open_store(database_url)
        store.get(urls[0])  # connect before the start, so the race measures claims
        barrier.wait()
        started = time.perf_counter()
        granted = []
        for url in urls:
            result = store.claim(url, worker, LEASE)
            if isinstance(result, Claim):
                granted.append((url, result.token, result.attempt))
        results.put((worker, granted, started, time.perf_counter(), len(urls)))
        store.close()
    except BaseException as error:  # report it: an exception in a child is otherwise lost
        results.put(f"{worker}: {type(error).__name__}: {error}")


@pytest.mark.parametrize("registered", [False, True], ids=["new", "registered"])
@pytest.mark.parametrize("via", ["direct", "pgbouncer"])
def test_race__eight_processes_claiming_the_same_files_grant_each_exactly_once(
    pg_store: PostgresStore,
    database_url: str,
    via: str,
    registered: bool,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """New files (the claim inserts the row) and registered ones (it updates a pending row:
    the fast path of migration 0015, one UPDATE re-checking `pending` under the lock), directly
    and through a transaction pooler."""
    if via == "pgbouncer":
        # The racers connect through a private PgBouncer in transaction mode (its pool of 20
        # server connections shared by the 8), told so as a deployment would tell them.
        database_url = request.getfixturevalue("bouncer").url(database_url)
        monkeypatch.setenv("PIPELINE_DATABASE_POOLER", "transaction")
    urls = [f"file:///race/{i:04d}.csv" for i in range(FILES)]
    if registered:
        pg_store.register(urls, batch_id="race")
    jobs = []
    for i in range(RACERS):
        order = list(urls)
        # Half go in the same order (head-on on the same rows), half in their own order.
        if i % 2:
            random.Random(i).shuffle(order)
        jobs.append((database_url, f"racer-{i}", order))
    reports = _race(_claimer, jobs)

    grants = [(url, token) for _, granted, *_ in reports for url, token, _ in granted]
    attempts = {attempt for _, granted, *_ in reports for _, _, attempt in granted}
    assert len(grants) == FILES
    assert sorted(url for url, _ in grants) == urls  # each one once, none twice
    assert attempts == {1}
    start = min(r[2] for r in reports)
    wall = max(r[3] for r in reports) - start
    claims = sum(r[4] for r in reports)
    per_process = sorted((len(granted) for _, granted, *_ in reports), reverse=True)
    print(
        f"\n[race {via}] {RACERS} processes x {FILES} files: {claims} claims, {len(grants)} grants "
        f"in {wall:.2f} s = {claims / wall:,.0f} claims/s, {len(grants) / wall:,.0f} grants/s; "
        f"grants per process {per_process}"
    )
    # The database agrees: one running attempt per file, held by the token that was granted.
    held = dict(grants)
    for url in (urls[0], urls[FILES // 2], urls[-1]):
        row = pg_store.get(url, with_attempts=True)
        assert row is not None
        assert (row.status, row.token) == (Status.PROCESSING, held[url])
        assert [a.outcome for a in row.attempts] == [Outcome.RUNNING]
    # One attempt per file in the history (running ones live on the checkpoint row until they
    # end: migration 0006), and no attempt row written yet, since none has ended.
    assert pg_store.scalar("SELECT count(*) FROM pipeline_attempts") == FILES
    assert pg_store.scalar("SELECT count(*) FROM file_attempts") == 0
    assert pg_store.scalar("SELECT count(DISTINCT token) FROM file_checkpoints") == FILES


# -- stale tokens race the current holders ----------------------------------------------------

STALE_FILES = 200
SINK = "race_sink"


def _writer(
    database_url: str,
    worker: str,
    work: list[tuple[str, int, str]],
    barrier: Any,
    results: Any,
) -> None:
    """Finish each (url, token, how): complete with output in a transaction, or fail."""
    try:
        store = pipeline.open_store(database_url)
        store.get(work[0][0])
        barrier.wait()
        landed, lost = [], []
        for url, token, how in work:
            try:
                store.heartbeat(url, token)
                if how == "complete":
                    with store.transaction(token=token) as tx:
                        tx.connection.execute(
                            sa.text(f"INSERT INTO {SINK} (file_url, token) VALUES (:u, :t)"),
                            {"u": url, "t": token},
                        )
                        store.complete(url, token, Stats(token % 97, 0, 1), transaction=tx)
                else:
                    store.fail(url, token, f"failed by {token}", retryable=False)
                landed.append(url)
            except errors.LostClaim:
                lost.append(url)
        results.put((worker, landed, lost))
        store.close()
    except BaseException as error:
        results.put(f"{worker}: {type(error).__name__}: {error}")


def test_race__stale_tokens_never_land_and_current_ones_always_do(
    pg_store: PostgresStore, database_url: str
) -> None:
    pg_store.execute_script(
        f"CREATE TABLE IF NOT EXISTS {SINK} (file_url text NOT NULL, token bigint NOT NULL);"
        f"TRUNCATE {SINK}"
    )
    urls = [f"file:///stale/{i:04d}.csv" for i in range(STALE_FILES)]
    zombies = {u: _granted(pg_store.claim(u, "zombie", LEASE)) for u in urls}
    # Every zombie's worker froze: its lease runs out and the file is taken over.
    pg_store.execute_script(
        "UPDATE file_checkpoints SET lease_expires_at = now() - interval '1 second'"
        " WHERE file_url LIKE 'file:///stale/%'"
    )
    current = {u: _granted(pg_store.claim(u, "current", LEASE)) for u in urls}
    assert {c.attempt for c in current.values()} == {2}
    how = {u: "complete" if i % 2 == 0 else "fail" for i, u in enumerate(urls)}

    # Racer pairs work on the same files in the same order, one with the stale tokens, one
    # with the current ones, so their writes meet on the same rows at the same moment.
    pairs = 4
    jobs = []
    for i in range(pairs):
        part = urls[i::pairs]
        jobs.append((database_url, f"zombie-{i}", [(u, zombies[u].token, how[u]) for u in part]))
        jobs.append((database_url, f"current-{i}", [(u, current[u].token, how[u]) for u in part]))
    reports = _race(_writer, jobs)

    by_role: dict[str, tuple[list[str], list[str]]] = {"zombie": ([], []), "current": ([], [])}
    for worker, landed, lost in reports:
        role = worker.split("-")[0]
        by_role[role][0].extend(landed)
        by_role[role][1].extend(lost)
    assert by_role["zombie"][0] == [], "a stale write landed"
    assert sorted(by_role["zombie"][1]) == urls
    assert sorted(by_role["current"][0]) == urls, "a current write was refused"
    assert by_role["current"][1] == []

    # The rows hold the current executions' results only; the zombies' output rolled back.
    for u in urls:
        row = pg_store.get(u, with_attempts=True)
        assert row is not None
        token = current[u].token
        if how[u] == "complete":
            assert (row.status, row.records_total) == (Status.COMPLETED, token % 97)
        else:
            assert (row.status, row.error_message) == (Status.DEAD, f"failed by {token}")
        assert [(a.worker, a.outcome) for a in row.attempts] == [
            ("zombie", Outcome.LOST),
            ("current", Outcome.COMPLETED if how[u] == "complete" else Outcome.FAILED),
        ]
    sink_tokens = pg_store.scalar(f"SELECT array_agg(token ORDER BY file_url) FROM {SINK}")
    assert sink_tokens == [current[u].token for u in urls if how[u] == "complete"]


def _granted(result: Claim | Refusal) -> Claim:
    assert isinstance(result, Claim), result
    return result


# -- concurrent `db upgrade` on a fresh database ----------------------------------------------


def _upgrader(database_url: str, barrier: Any, results: Any) -> None:
    try:
        store = pipeline.open_store(database_url)
        barrier.wait()
        applied = store.upgrade()
        results.put((applied, store.schema_version()))
        store.close()
    except BaseException as error:
        results.put(f"{type(error).__name__}: {error}")


def test_race__four_concurrent_upgrades_of_a_fresh_database_apply_each_migration_once(
    fresh_database_url: str,
) -> None:
    reports = _race(_upgrader, [(fresh_database_url,)] * 4)
    names = [name for _, name, _ in postgres.migrations()]
    latest = postgres.migrations()[-1][0]
    applied = [name for done, _ in reports for name in done]
    assert applied == names  # all of them, once, by whichever process came first
    assert sorted(len(done) for done, _ in reports) == [0, 0, 0, len(names)]
    assert {version for _, version in reports} == {latest}
    store = pipeline.open_store(fresh_database_url)
    try:
        assert store.upgrade() == []
        claim = store.claim("file:///fresh/a.csv", "w1")
        assert isinstance(claim, Claim)
    finally:
        store.close()
