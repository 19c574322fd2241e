"""One delivery, from claim to outcome (pipeline/worker/execution.py), against a scripted store.

Each test scripts what the store answers (a grant, a refusal, an outage, a lost claim) and
checks what the execution does with it: whether the function runs, how often, what it
records, and what the task returns or raises. The store's own rules are tested on
PostgreSQL (tests/integration/test_store_contract.py); here the store only answers. An outage
mid-delivery is waited out in pipeline/worker/outage.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest
from celery.exceptions import Retry, SoftTimeLimitExceeded

from pipeline import errors
from pipeline.models import Checkpoint, Claim, FailResult, Reason, Refusal, Stats, Status
from pipeline.worker import execution, outage, runtime
from pipeline.worker.options import Backoff, Spec

URL = "file:///data/a.jsonl"
DOWN = errors.StoreUnavailable("checkpoint database unreachable")


def claim(token: int = 7, attempt: int = 1, lease: float = 30.0) -> Claim:
    return Claim(URL, token, attempt, 3, lease, 1)


@dataclasses.dataclass
class Output:
    """The stub's output transaction: how it ended."""

    connection: Any = None
    ended: str = "open"


class ScriptedStore:
    """Answers in the order the test gives; records every call."""

    def __init__(self, *claims: Any, completes: tuple[Any, ...] = ()) -> None:
        self.claims = list(claims)
        self.completes = list(completes)
        self.heartbeats: list[Any] = []
        self.chunks: list[Any] = []
        self.fails: list[Any] = []
        # What get() answers: by default the row as it is while the claim is held.
        self.row: Checkpoint | None = _row()
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.outputs: list[Output] = []
        self._tokens = iter(range(100, 10_000))

    def _answer(self, queue: list[Any], default: Any) -> Any:
        answer = queue.pop(0) if queue else default
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def reserve_token(self) -> int:
        return next(self._tokens)

    def claim(self, file_url: str, worker_id: str, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(("claim", kwargs))
        return self._answer(self.claims, claim())

    def heartbeat(self, file_url: str, token: int) -> float | None:
        self.calls.append(("heartbeat", {"token": token}))
        answer: float | None = self._answer(self.heartbeats, 30.0)
        return answer

    def complete(self, file_url: str, token: int, stats: Any = None, **kwargs: Any) -> None:
        self.calls.append(("complete", {"token": token, "stats": stats, **kwargs}))
        self._answer(self.completes, None)

    def commit_chunk(self, file_url: str, token: int, position: Any, **kwargs: Any) -> float:
        self.calls.append(("commit_chunk", {"token": token, "position": position, **kwargs}))
        answer: float = self._answer(self.chunks, 30.0)
        return answer

    def restart(self, file_url: str, token: int, version: Any, fingerprint: Any = None) -> int:
        self.calls.append(("restart", {"token": token, "version": version}))
        return 2

    def fail(self, file_url: str, token: int, error: Any, **kwargs: Any) -> FailResult:
        self.calls.append(("fail", {"token": token, "error": error, **kwargs}))
        default = FailResult(Status.FAILED, 1, 3, retry_in=kwargs.get("retry_in"))
        answer: FailResult = self._answer(self.fails, default)
        return answer

    def get(self, file_url: str, *, with_attempts: bool = False) -> Checkpoint | None:
        return self.row

    @contextlib.contextmanager
    def transaction(self, *, token: int | None = None) -> Iterator[Output]:
        output = Output()
        self.outputs.append(output)
        try:
            yield output
        except BaseException:
            output.ended = "rolled back"
            raise
        output.ended = "committed"

    def unavailable(self, error: BaseException) -> bool:
        return isinstance(error, ConnectionError)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [kwargs for called, kwargs in self.calls if called == name]


class FakeTask:
    """What execution reads of a Celery task, and a `retry` that records and returns."""

    name = "tests.fake"
    soft_time_limit = None

    def __init__(self, *, eager: bool = False) -> None:
        self.request = types.SimpleNamespace(
            id="task-1", hostname="node", is_eager=eager, retries=0
        )
        self.retried: list[dict[str, Any]] = []
        self.states: list[tuple[str, dict[str, Any]]] = []

    def update_state(self, state: str, meta: dict[str, Any]) -> None:
        self.states.append((state, meta))

    def send_event(self, type_: str, **fields: Any) -> None:
        self.states.append((type_, fields))

    def retry(self, exc: Any = None, countdown: float = 0, **kwargs: Any) -> Retry:
        self.retried.append({"exc": exc, "countdown": countdown, **kwargs})
        return Retry(str(exc), exc=exc, when=countdown)


SPEC = Spec(
    file_type="events",
    max_attempts=3,
    lease_seconds=30.0,
    retry_on=(Exception,),
    dont_retry_on=(),
    backoff=Backoff(2.0, 300.0, jitter=False),
    wants_checkpoint=True,
)


@pytest.fixture(autouse=True)
def quick_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """No real pauses while a test's database is 'away'."""
    monkeypatch.setattr(outage, "STORE_WAITS", (0.0,))
    monkeypatch.setattr(outage, "RESOURCE_WAITS", (0.0,))


def deliver(store: ScriptedStore, fn: Any, task: FakeTask | None = None, **kwargs: Any) -> Any:
    runtime.set_store(store)  # type: ignore[arg-type]
    try:
        return execution.run(task or FakeTask(), fn, SPEC, URL, (), kwargs)
    finally:
        runtime.set_store(None)


class Recorder:
    """A task function that records its calls and returns (or raises) what it is given."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    def __call__(self, file_url: str, *, checkpoint: Any) -> Any:
        self.calls += 1
        with checkpoint.transaction():
            pass
        outcome = self.outcomes.pop(0) if self.outcomes else {"total": 1, "persisted": 1}
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def test_granted__runs_once_and_completes_in_the_output_transaction() -> None:
    store, fn = ScriptedStore(), Recorder({"total": 3, "filtered": 1, "persisted": 2})
    result = deliver(store, fn)
    assert fn.calls == 1
    assert result == {"file_url": URL, "attempt": 1, "total": 3, "filtered": 1, "persisted": 2}
    (completed,) = store.named("complete")
    assert completed["stats"] == Stats(3, 1, 2)
    assert completed["transaction"] is store.outputs[0]
    assert store.outputs[0].ended == "committed"


@pytest.mark.parametrize(
    ("refusal", "reason"),
    [
        (Refusal(URL, Reason.DONE, stats=Stats(5, 0, 5)), "already completed"),
        (Refusal(URL, Reason.BUSY, retry_in=12.34), "in progress elsewhere"),
        (Refusal(URL, Reason.NOT_DUE, retry_in=60.0), "retry not due yet"),
        (Refusal(URL, Reason.CANCELLED), "batch cancelled"),
        (Refusal(URL, Reason.PAUSED), "batch paused"),
        # held by the database; the next of its batch's files to end sends it (0023)
        (Refusal(URL, Reason.LIMITED), "held by the batch's limit"),
    ],
)
def test_refused__skips_without_running_the_function(refusal: Refusal, reason: str) -> None:
    store, fn = ScriptedStore(refusal), Recorder()
    result = deliver(store, fn)
    assert fn.calls == 0
    assert (result["skipped"], result["reason"]) == (True, reason)
    assert store.named("complete") == store.named("fail") == []


def test_refused_busy__says_when_the_holders_lease_ends() -> None:
    result = deliver(ScriptedStore(Refusal(URL, Reason.BUSY, retry_in=12.34)), Recorder())
    assert result["lease_ends_in"] == 12.3


def test_refused_not_due_by_a_hair__retries_when_it_is_due() -> None:
    task = FakeTask()
    with pytest.raises(Retry):
        deliver(ScriptedStore(Refusal(URL, Reason.NOT_DUE, retry_in=1.5)), Recorder(), task)
    (retry,) = task.retried
    assert retry["countdown"] == pytest.approx(1.6)


def test_refused_dead__is_file_dead() -> None:
    with pytest.raises(errors.FileDead, match="is dead: boom"):
        deliver(ScriptedStore(Refusal(URL, Reason.DEAD, error="boom")), Recorder())


def test_refused_for_a_reason_this_code_does_not_know__fails_loudly_not_dead() -> None:
    unknown = Refusal(URL, "frozen")  # type: ignore[arg-type]
    with pytest.raises(errors.PipelineError) as raised:
        deliver(ScriptedStore(unknown), Recorder())
    assert not isinstance(raised.value, errors.FileDead)


def test_database_away_before_the_claim__waits_then_claims_carrying_its_tokens() -> None:
    store, fn = ScriptedStore(DOWN, DOWN, claim()), Recorder()
    deliver(store, fn)
    assert fn.calls == 1
    tries = store.named("claim")
    assert len(tries) == 3
    # Each try proposes a new token and names the ones proposed before, so that a claim that
    # committed with its reply lost is resumed, not found BUSY.
    assert [t["resume_token"] for t in tries] == [None, [100], [100, 101]]
    assert [t["token"] for t in tries] == [100, 101, 102]


def test_database_away_past_the_soft_time_limit__steps_back_carrying_its_tokens() -> None:
    task = FakeTask()
    with pytest.raises(Retry):
        deliver(ScriptedStore(DOWN, SoftTimeLimitExceeded()), Recorder(), task)
    (retry,) = task.retried
    # The next delivery of this chain proposes these again: a claim that committed without
    # its reply is resumed by it.
    assert retry["kwargs"]["_pipeline_resume"] == [100, 101]


def test_database_away_under_apply__the_retry_state_comes_back_without_a_resend() -> None:
    # Celery runs an eager retry at once, ignoring its countdown: re-sending would recurse.
    task = FakeTask(eager=True)
    with pytest.raises(Retry):
        deliver(ScriptedStore(DOWN), Recorder(), task)
    assert task.retried == []


def test_function_raised_with_attempts_left__records_the_backoff_and_retries() -> None:
    store, task = ScriptedStore(claim(attempt=2)), FakeTask()
    with pytest.raises(Retry):
        deliver(store, Recorder(ValueError("bad line")), task)
    (failed,) = store.named("fail")
    assert failed["retryable"] is True
    assert failed["retry_in"] == 4.0  # base 2 s doubled once for the second attempt
    assert store.outputs[0].ended == "rolled back"
    assert task.retried[0]["countdown"] == pytest.approx(4.05)


def test_permanent_error__recorded_not_retryable_and_file_dead() -> None:
    store = ScriptedStore()
    store.fails = [FailResult(Status.DEAD, 1, 3)]
    with pytest.raises(errors.FileDead, match="dead after attempt 1 of 3"):
        deliver(store, Recorder(errors.PermanentError("unreadable")))
    assert store.named("fail")[0]["retryable"] is False


def test_completion_refused_as_a_stale_token__output_discarded() -> None:
    store = ScriptedStore(completes=(errors.LostClaim.of(URL, 7, "completion not applied"),))
    result = deliver(store, Recorder())
    assert (result["skipped"], result["reason"]) == (
        True,
        "claim lost to a newer execution; output discarded",
    )
    assert store.outputs[0].ended == "rolled back"
    assert store.named("fail") == []


def test_database_lost_at_completion_with_the_claim_still_held__runs_again_same_claim() -> None:
    store, fn = ScriptedStore(completes=(DOWN, None)), Recorder()
    result = deliver(store, fn)
    assert fn.calls == 2
    assert result["attempt"] == 1
    # Between the two starts, an empty transaction showed that output can be written again.
    assert [o.ended for o in store.outputs] == ["rolled back", "committed", "committed"]
    assert {c["token"] for c in store.named("complete")} == {7}


def test_database_lost_after_the_completion_committed__reports_it_without_running_again() -> None:
    store, fn = ScriptedStore(completes=(DOWN,)), Recorder()
    store.heartbeats = [None]  # the claim is no longer live: the row says why
    store.row = dataclasses.replace(_row(), status=Status.COMPLETED, token=7, records_total=4)
    result = deliver(store, fn)
    assert fn.calls == 1
    assert (result["attempt"], result["total"]) == (1, 4)


def test_database_lost_and_the_claim_taken_over_meanwhile__output_discarded() -> None:
    store, fn = ScriptedStore(completes=(DOWN,)), Recorder()
    store.heartbeats = [None]
    store.row = dataclasses.replace(_row(), status=Status.PROCESSING, token=8)
    result = deliver(store, fn)
    assert fn.calls == 1
    assert result["reason"] == "claim lost while the database was away; output discarded"


def test_output_transaction_broken_every_start__the_attempt_fails_after_the_bound() -> None:
    bound = outage.MAX_STARTS_PER_ATTEMPT
    store, fn = ScriptedStore(completes=(DOWN,) * bound), Recorder()
    with pytest.raises(Retry):
        deliver(store, fn)
    assert fn.calls == bound
    (failed,) = store.named("fail")
    assert isinstance(failed["error"], errors.TransactionBroken)


def test_function_of_a_claim_lost_to_its_heartbeat__output_discarded() -> None:
    # The lease keeper renews every lease/3; a renewal that finds the claim gone marks it lost,
    # and the completion is not even tried.
    store = ScriptedStore(claim(lease=0.15))
    store.heartbeats = [None]

    def slow(file_url: str, *, checkpoint: Any) -> dict[str, int]:
        with checkpoint.transaction():
            time.sleep(0.3)
        return {"total": 1}

    result = deliver(store, slow)
    assert result["reason"] == "claim lost to a newer execution; output discarded"
    assert store.named("complete") == []


def test_url_with_credentials__refused_before_anything_is_stored() -> None:
    store = ScriptedStore()
    runtime.set_store(store)  # type: ignore[arg-type]
    try:
        with pytest.raises(errors.InvalidURL) as raised:
            execution.run(FakeTask(), Recorder(), SPEC, "s3://key:secret@bkt/a.jsonl", (), {})
    finally:
        runtime.set_store(None)
    assert "secret" not in str(raised.value)
    assert store.calls == []


class ChunkedReader:
    """A chunked task over lines 1..`lines`, `per` lines a chunk, resuming where it left off;
    records the lines it wrote (a chunk's lines count once its commit returns)."""

    def __init__(self, lines: int, per: int) -> None:
        self.lines, self.per = lines, per
        self.starts: list[Any] = []
        self.written: list[int] = []

    def __call__(self, file_url: str, *, checkpoint: Any) -> dict[str, int]:
        start = checkpoint.resume("v1") or 0
        self.starts.append(start)
        for first in range(start + 1, self.lines + 1, self.per):
            last = min(first + self.per - 1, self.lines)
            with checkpoint.chunk(last) as chunk:
                chunk.stats = Stats(last, 0, last)
            self.written.extend(range(first, last + 1))
        return {"total": self.lines, "persisted": self.lines}


def test_chunks__each_commits_its_position_in_a_transaction_of_its_own() -> None:
    store, task, reader = ScriptedStore(), FakeTask(), ChunkedReader(25, 10)
    deliver(store, reader, task)
    assert [c["position"] for c in store.named("commit_chunk")] == [10, 20, 25]
    assert all(
        c["transaction"] is o
        for c, o in zip(store.named("commit_chunk"), store.outputs, strict=True)
    )
    assert [o.ended for o in store.outputs] == ["committed"] * 3
    assert store.named("complete")[0]["transaction"] is None  # the output is in already
    assert [s for s, _ in task.states].count("PROGRESS") == 3
    assert task.states[-2][1]["records"] == 25


def test_chunks__an_attempt_resumes_at_the_position_of_its_claim() -> None:
    store = ScriptedStore(dataclasses.replace(claim(attempt=2), position=20, version="v1"))
    reader = ChunkedReader(25, 10)
    deliver(store, reader)
    assert reader.starts == [20]
    assert reader.written == [21, 22, 23, 24, 25]


def test_disk_full_at_completion_more_times_than_the_starts__same_attempt_completes() -> None:
    # The database short of disk refuses the output seven times running: not the attempt's
    # fault, so none of those starts counts; the eighth commits, attempt 1.
    full = errors.StoreUnavailable("checkpoint database unavailable (disk full)", cause="disk full")
    store, fn = ScriptedStore(completes=(*([full] * 7), None)), Recorder()
    result = deliver(store, fn)
    assert fn.calls == 8
    assert result["attempt"] == 1
    assert store.named("fail") == []


def test_unreachable_at_completion_every_start__the_attempt_fails_after_its_starts() -> None:
    store, fn = ScriptedStore(completes=(DOWN,) * 6), Recorder()
    with pytest.raises(Retry):
        deliver(store, fn)
    assert fn.calls == outage.MAX_STARTS_PER_ATTEMPT
    (failed,) = store.named("fail")
    assert "broke the output transaction" in str(failed["error"])


def test_chunks__after_an_outage_mid_file_the_next_start_begins_at_the_last_commit() -> None:
    store, reader = ScriptedStore(), ChunkedReader(30, 10)
    store.chunks = [30.0, DOWN]  # the second chunk's commit breaks
    store.row = dataclasses.replace(_row(), position=10, position_version="v1")
    deliver(store, reader)
    assert reader.starts == [0, 10]
    assert reader.written == list(
        range(1, 31)
    )  # lines 11-20 written once: the broken one rolled back
    assert [o.ended for o in store.outputs] == [
        "committed",
        "rolled back",
        "committed",  # the empty transaction showing that output can be written again
        "committed",
        "committed",
    ]


def test_chunks__a_claim_lost_to_its_heartbeat_commits_no_further_chunk() -> None:
    store = ScriptedStore(claim(lease=0.15))
    store.heartbeats = [None]

    def slow(file_url: str, *, checkpoint: Any) -> dict[str, int]:
        with checkpoint.chunk(1):
            time.sleep(0.3)
        return {"total": 1}

    result = deliver(store, slow)
    assert result["reason"] == "claim lost to a newer execution; output discarded"
    assert store.named("commit_chunk") == []
    assert store.outputs[0].ended == "rolled back"


def test_chunks__a_chunk_that_says_nowhere_fails_the_attempt() -> None:
    store = ScriptedStore()

    def nowhere(file_url: str, *, checkpoint: Any) -> None:
        with checkpoint.chunk():
            pass

    with pytest.raises(Retry):
        deliver(store, nowhere)
    (failed,) = store.named("fail")
    assert "chunk.position" in str(failed["error"])


def test_resume__another_version_of_the_object_starts_a_new_generation_from_the_start() -> None:
    store = ScriptedStore(dataclasses.replace(claim(attempt=2), position=20, version="old"))
    reader = ChunkedReader(25, 10)
    deliver(store, reader)
    assert store.named("restart") == [{"token": 7, "version": "v1"}]
    assert reader.starts == [0]
    assert reader.written == list(range(1, 26))


def _row() -> Checkpoint:
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    return Checkpoint(
        file_url=URL,
        file_type="events",
        status=Status.PROCESSING,
        attempt=1,
        max_attempts=3,
        generation=1,
        token=7,
        records_total=0,
        records_filtered=0,
        records_persisted=0,
        processing_time_ms=0,
        error_message=None,
        processed_by="node:1",
        task_name="tests.fake",
        task_id="task-1",
        batch_id=None,
        fingerprint=None,
        lease_expires_at=now,
        started_at=now,
        completed_at=None,
        created_at=now,
        updated_at=now,
    )


def test_chunks__a_cancelled_batch_stops_the_file_after_the_chunk_that_committed() -> None:
    store, reader = ScriptedStore(), ChunkedReader(30, 10)
    store.chunks = [30.0, 0.0]  # the second chunk's commit finds the batch cancelled
    result = deliver(store, reader)
    assert (result["skipped"], result["reason"]) == (True, "batch cancelled; stopped at a chunk")
    # The second chunk's block raised once its commit returned: the reader went no further.
    assert reader.written == list(range(1, 11))
    assert [o.ended for o in store.outputs] == ["committed", "committed"]
    assert store.named("complete") == store.named("fail") == []
