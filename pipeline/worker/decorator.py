"""`@checkpointed`: a plain function of a file URL becomes a crash-safe Celery task."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from billiard.exceptions import WorkerLostError
from celery import Task
from celery.exceptions import Retry, SoftTimeLimitExceeded
from celery.worker.request import Request

from pipeline import errors, masking
from pipeline.models import Claim, ClaimResult, FailResult, Reason, Refusal, Stats, Status
from pipeline.store import DEFAULT_LEASE_SECONDS, DEFAULT_MAX_ATTEMPTS, Store, resume_tokens

logger = logging.getLogger("pipeline")


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: delay n is uniform in [0, min(cap, base * 2**n)]."""

    base: float = 2.0
    cap: float = 300.0
    jitter: bool = True

    def delay(self, n: int) -> float:
        ceiling = min(self.cap, self.base * (2 ** max(n, 0)))
        return random.uniform(ceiling / 2, ceiling) if self.jitter else ceiling


@dataclasses.dataclass(frozen=True)
class Spec:
    """The options of one checkpointed task."""

    file_type: str
    max_attempts: int
    lease_seconds: float
    retry_on: tuple[type[BaseException], ...]
    dont_retry_on: tuple[type[BaseException], ...]
    backoff: Backoff
    wants_checkpoint: bool

    def retryable(self, error: BaseException) -> bool:
        if isinstance(error, (*self.dont_retry_on, errors.PermanentError)):
            return False
        return isinstance(error, self.retry_on)


class Held:
    """A claim whose lease the keeper renews; `lost` is set when a renewal finds it gone."""

    __slots__ = ("claim", "due", "interval", "lost", "misses", "store")

    def __init__(self, store: Store, claim: Claim) -> None:
        self.store = store
        self.claim = claim
        self.interval = max(claim.lease_seconds / 3.0, 0.05)
        self.due = time.monotonic() + self.interval
        self.lost = threading.Event()
        self.misses = 0  # renewals failed in a row (database unreachable)


class LeaseKeeper:
    """One thread per process renews the lease of every claim it runs, every lease/3.

    It runs in the process that runs the function, so a frozen process (SIGSTOP) renews
    nothing and loses its leases, as it must. One thread, not one per task: starting a
    thread per task costs more than the claim itself.
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # A fork copies neither the thread nor a usable lock: start afresh in the child.
        self._cond = threading.Condition()
        self._held: dict[int, Held] = {}
        self._thread: threading.Thread | None = None
        # When the keeper will next wake by itself (None: waiting for a first claim).
        self._wake_at: float | None = None

    def hold(self, store: Store, claim: Claim) -> Held:
        held = Held(store, claim)
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="pipeline-lease-keeper", daemon=True
                )
                self._thread.start()
            self._held[claim.token] = held
            # Wake the keeper only if it would otherwise sleep past this claim's first renewal:
            # one task after another (the common case) then costs no thread switch at all.
            if self._wake_at is None or held.due < self._wake_at:
                self._cond.notify()
        return held

    def release(self, held: Held) -> None:
        with self._cond:
            self._held.pop(held.claim.token, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [h for h in self._held.values() if h.due <= now]
                if not due:
                    self._wake_at = min((h.due for h in self._held.values()), default=None)
                    self._cond.wait(None if self._wake_at is None else self._wake_at - now)
                    continue
                for h in due:
                    h.due = now + h.interval
            for h in due:
                self._renew(h)

    def _renew(self, held: Held) -> None:
        url, token = held.claim.file_url, held.claim.token
        try:
            left = held.store.heartbeat(url, token)
            held.misses = 0
            if left is None:
                logger.warning("lost the claim on %s (token %s)", url, token)
                held.lost.set()
                self.release(held)
        except errors.StoreUnavailable as error:
            # Keep trying: the lease is long enough to survive a missed beat or two. Said the
            # first time and then every tenth, not every lease/3 for the length of an outage.
            held.misses += 1
            if held.misses % 10 == 1:
                logger.warning("heartbeat for %s failed (%d in a row): %s", url, held.misses, error)
        except Exception:  # never let the keeper die
            logger.exception("heartbeat for %s crashed", url)


keeper = LeaseKeeper()


class CheckpointContext:
    """What the function sees as `checkpoint`: the claim and a transaction for its output."""

    def __init__(self, store: Store, claim: Claim, stack: contextlib.ExitStack) -> None:
        self._store = store
        self._claim = claim
        self._stack = stack
        self._tx: Any = None
        #: Stored on the row with the stats when the file completes (e.g. example problems).
        self.details: dict[str, Any] = {}

    file_url = property(lambda self: self._claim.file_url)
    token = property(lambda self: self._claim.token)
    attempt = property(lambda self: self._claim.attempt)
    max_attempts = property(lambda self: self._claim.max_attempts)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """A connection in a transaction on the checkpoint database.

        It does not commit when the block ends: the decorator marks the file completed in
        the same transaction after the function returns, fenced by the claim's token, then
        commits. If the claim was lost meanwhile, everything written here is rolled back.
        """
        if self._tx is None:
            self._tx = self._stack.enter_context(self._store.transaction(token=self._claim.token))
        yield self._tx.connection

    @property
    def output_transaction(self) -> Any:
        return self._tx


class CheckpointRequest(Request):  # type: ignore[misc]
    """A task request that releases its file at once when its pool process dies.

    Runs in the worker's main process, which saw the child die (SIGKILL, OOM, or killed by
    the pool at the hard time limit): the claim that child held for this task is released
    (attempt recorded lost) before Celery requeues or acks the message, so the file is
    granted again without waiting for the lease to run out.
    """

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        exc = exc_info.exception
        # billiard wraps the error it reports for a dead child
        exc = getattr(exc, "exc", exc) if type(exc).__name__ == "ExceptionWithTraceback" else exc
        if isinstance(exc, WorkerLostError):
            self._release("died")
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if not soft:
            # The pool kills the child and Celery acks the message (a failure): the released
            # row is due at once, so the sweep re-enqueues it if nothing else does.
            self._release(f"was killed at the hard time limit of {timeout} s")
        super().on_timeout(soft, timeout)

    def _release(self, what: str) -> None:
        if not (self.worker_pid and self.args):
            return
        worker_id = f"{self.hostname or 'local'}:{self.worker_pid}"
        try:
            from pipeline.worker.celery_app import get_store

            status = get_store().abandon(str(self.args[0]), worker_id, self.id)
            if status is not None:
                logger.warning(
                    "%s %s on %s; released it (now %s)", worker_id, what, self.args[0], status
                )
        except Exception:
            # Never break the worker's main loop: the lease expiry still frees the file.
            logger.exception("could not release %s after its process %s", self.args[0], what)


def _worker_id(task: Task) -> str:
    return f"{task.request.hostname or 'local'}:{os.getpid()}"


def _skipped(file_url: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {"file_url": file_url, "skipped": True, "reason": reason, **extra}


# A file that runs longer than this is taken for stuck (a FIFO, a hung server): an hour.
DEFAULT_SOFT_TIME_LIMIT = 3600.0
# The hard limit's margin over the soft one: time for the function to clean up and fail.
HARD_LIMIT_GRACE = 60.0
# How often the function may start within one attempt: a start whose output transaction the
# database broke (a restart, a cut connection) runs again under the same claim once the
# database answers, at most this many starts in all; past that the attempt is failed.
MAX_STARTS_PER_ATTEMPT = 5
# Pauses while waiting for the database where the execution stands (seconds, then the last
# one repeated): short, so a file carries on within a few seconds of the database's return.
STORE_WAITS = (0.2, 0.5, 1.0, 1.0, 2.0)
# A delivery that comes this close before its retry is due waits for it instead of being
# dropped (clock steps between worker and database, an ETA fired a hair early).
NOT_DUE_SLACK = 2.0

T = TypeVar("T")


def run(
    task: Task, fn: Callable[..., Any], spec: Spec, file_url: str, args: Any, kwargs: Any
) -> Any:
    """One delivery: claim, run with heartbeat, complete or fail (Postgres decides)."""
    from pipeline.worker.celery_app import get_store

    if masking.has_userinfo(file_url):
        # A message sent around `pipeline submit` (task.delay): never store nor show the secret.
        raise errors.InvalidURL(
            f"{masking.mask_url(file_url)} carries credentials: give them as storage options "
            "(environment or fsspec configuration), not in the URL",
            url=masking.mask_url(file_url),
        )
    # Tokens of claims an older message of this chain may still hold (pre-0.2 step-backs).
    resume = resume_tokens(kwargs.pop("_pipeline_resume", None)) or []
    store = get_store()
    proposed: list[int] = []

    def claim() -> ClaimResult:
        # The token is reserved before the call, so that if the claim commits but its reply
        # is lost, the next try resumes that claim (same attempt) instead of finding it BUSY.
        token = store.reserve_token()
        earlier = [*resume, *proposed]
        proposed.append(token)
        return store.claim(
            file_url,
            _worker_id(task),
            spec.lease_seconds,
            max_attempts=spec.max_attempts,
            file_type=spec.file_type,
            task_name=task.name,
            task_id=task.request.id,
            resume_token=earlier or None,
            token=token,
        )

    try:
        # Never run unclaimed; waiting for the database is not an attempt, and it happens
        # here, holding this message: no copy goes to the broker while the database is away.
        result = wait_for_store(claim, f"claiming {file_url}", patient=not task.request.is_eager)
    except (SoftTimeLimitExceeded, errors.StoreUnavailable) as error:
        # Waited for the database past the task's soft time limit (or eager: no waiting under
        # apply()): step back to the broker, carrying the tokens proposed so far.
        carried = {**kwargs, "_pipeline_resume": [*resume, *proposed]}
        raise _retry_later(task, error, spec.backoff.delay(task.request.retries), carried) from None

    if isinstance(result, Refusal):
        return _refused(task, spec, result, kwargs)
    return _execute(task, fn, spec, store, result, args, kwargs)


def wait_for_store(call: Callable[[], T], what: str, *, patient: bool = True) -> T:
    """`call()`, again and again while the store is unavailable, pausing a little longer each
    time (STORE_WAITS): the execution waits where it stands for the database. Not `patient`:
    the first StoreUnavailable is raised."""
    n = 0
    while True:
        try:
            return call()
        except errors.StoreUnavailable as error:
            if not patient:
                raise
            pause = STORE_WAITS[min(n, len(STORE_WAITS) - 1)]
            if n % 12 == 0:  # the first time, then about once a minute
                logger.warning("%s: %s; waiting for the database", what, error)
            n += 1
            time.sleep(pause)


def _refused(task: Task, spec: Spec, refusal: Refusal, kwargs: Any) -> Any:
    if refusal.reason is Reason.DONE:
        stats = refusal.stats.as_dict() if refusal.stats else {}
        return _skipped(refusal.file_url, "already completed", stats=stats)
    if refusal.reason is Reason.BUSY:
        # Another live execution holds it: this delivery is only a copy (a redelivery, a
        # duplicate). The holder finishes the file, or its lease expires and the sweep hands
        # the file on; scheduling a retry here is what multiplied messages for long files.
        return _skipped(
            refusal.file_url,
            "in progress elsewhere",
            lease_ends_in=round(refusal.retry_in or 0.0, 1),
        )
    if refusal.reason is Reason.NOT_DUE:
        left = refusal.retry_in or 0.0
        if left <= NOT_DUE_SLACK:
            # A hair early (clocks): come back when it is due rather than wait for the sweep.
            raise _retry_later(
                task,
                errors.FileBusy(f"{refusal.file_url} is due in {left:.1f}s", url=refusal.file_url),
                left + 0.1,
                kwargs,
            )
        # Its backoff is not over: an early copy. The retry message (or the sweep, once the
        # retry is overdue) brings the file back when the database says it is due.
        return _skipped(refusal.file_url, "retry not due yet", due_in=round(left, 1))
    raise errors.FileDead(f"{refusal.file_url} is dead: {refusal.error}", url=refusal.file_url)


def _execute(
    task: Task,
    fn: Callable[..., Any],
    spec: Spec,
    store: Store,
    claim: Claim,
    args: Any,
    kwargs: Any,
) -> Any:
    heartbeat = keeper.hold(store, claim)
    last_error: BaseException | None = None
    try:
        for start in range(1, MAX_STARTS_PER_ATTEMPT + 1):
            try:
                return _run_once(fn, spec, store, claim, heartbeat, args, kwargs)
            except errors.LostClaim:
                # A newer claim took the file over (we were frozen or too slow): our writes
                # were fenced off and rolled back; the new holder's result stands.
                return _output_discarded(claim)
            except errors.StoreUnavailable as error:
                if _raised_during(error, errors.LostClaim):
                    # The rollback on the way out of a lost claim failed because the takeover
                    # ended our output transaction's session (pipeline_fence_v1): still a lost
                    # claim, not an outage, and nothing of ours was committed.
                    return _output_discarded(claim)
                # The database went away mid-execution: wait for it here, holding the message
                # and the pool process, then find out what became of the claim.
                logger.warning(
                    "database lost during %s (start %d of at most %d in this attempt): %s",
                    claim.file_url,
                    start,
                    MAX_STARTS_PER_ATTEMPT,
                    error,
                )
                where = wait_for_store(
                    lambda: _where_is(store, claim), f"resuming {claim.file_url}"
                )
                if isinstance(where, dict):
                    return where  # our completion had committed; only its reply was lost
                if where is None:
                    logger.warning("claim on %s lost while the database was away", claim.file_url)
                    return _skipped(
                        claim.file_url, "claim lost while the database was away; output discarded"
                    )
                # Still ours: the broken output transaction was rolled back; start again,
                # same claim, same attempt.
                last_error = error
        raise errors.TransactionBroken(
            f"the database broke the output transaction of {claim.file_url} "
            f"{MAX_STARTS_PER_ATTEMPT} times in one attempt; last: {last_error}",
            url=claim.file_url,
        )
    except SoftTimeLimitExceeded as error:
        return _failed(
            task,
            spec,
            store,
            claim,
            errors.TimeLimitExceeded(
                f"soft time limit of {task.soft_time_limit or '?'} s exceeded", url=claim.file_url
            ),
            kwargs,
            cause=error,
        )
    except Exception as error:
        return _failed(task, spec, store, claim, error, kwargs)
    finally:
        keeper.release(heartbeat)


def _run_once(
    fn: Callable[..., Any],
    spec: Spec,
    store: Store,
    claim: Claim,
    heartbeat: Held,
    args: Any,
    kwargs: Any,
) -> dict[str, Any]:
    """One start of the function under `claim`, completed in its output transaction."""
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        context = CheckpointContext(store, claim, stack)
        call_kwargs = dict(kwargs)
        if spec.wants_checkpoint:
            call_kwargs["checkpoint"] = context
        try:
            result = fn(claim.file_url, *args, **call_kwargs)
            stats = Stats.coerce(result)
            if heartbeat.lost.is_set():
                raise errors.LostClaim(url=claim.file_url, token=claim.token)
            store.complete(
                claim.file_url,
                claim.token,
                stats,
                processing_time_ms=int((time.monotonic() - started) * 1000),
                details=context.details or None,
                transaction=context.output_transaction,
            )
        except (errors.LostClaim, errors.StoreUnavailable):
            raise  # rolls the output back on the way out of the stack
        except Exception as error:
            if store.unavailable(error):
                # First line only (SQLAlchemy appends the statement and its parameters), and
                # with any URL password masked: this text reaches the logs and Flower.
                first = (str(error) or type(error).__name__).splitlines()[0]
                raise errors.StoreUnavailable(masking.scrub(first)) from error
            raise
    return _completed(claim, stats)  # committed: output and 'completed' together


def _completed(claim: Claim, stats: Stats) -> dict[str, Any]:
    """The task's result for a file it completed."""
    return {"file_url": claim.file_url, "attempt": claim.attempt, **stats.as_dict()}


def _output_discarded(claim: Claim) -> dict[str, Any]:
    logger.warning("claim on %s lost; output discarded", claim.file_url)
    return _skipped(claim.file_url, "claim lost to a newer execution; output discarded")


def _where_is(store: Store, claim: Claim) -> dict[str, Any] | bool | None:
    """After an outage: True if `claim` is still held (its lease renewed now), the result if
    its completion had committed, None if the claim was lost meanwhile."""
    if store.heartbeat(claim.file_url, claim.token) is not None:
        return True
    row = store.get(claim.file_url)
    if row is not None and row.token == claim.token and row.status is Status.COMPLETED:
        return _completed(claim, row.stats)
    return None


def _retry_later(task: Task, exc: BaseException, countdown: float, kwargs: Any) -> Retry:
    """Retry after `countdown` seconds of waiting: not an attempt.

    Celery runs an eager task's retry at once, ignoring the countdown, so under `apply()` or
    task_always_eager this wait would re-run the task without pause until the stack overflows
    (RecursionError). The eager caller gets the RETRY state and the reason back instead.
    """
    if task.request.is_eager:
        return Retry(str(exc), exc=exc, when=countdown)
    return task.retry(exc=exc, countdown=countdown, max_retries=None, kwargs=kwargs)


def _raised_during(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether `error` was raised while handling an exception of type `kind`."""
    seen: set[int] = set()
    context = error.__context__
    while context is not None and id(context) not in seen:
        if isinstance(context, kind):
            return True
        seen.add(id(context))
        context = context.__context__
    return False


def _failed(
    task: Task,
    spec: Spec,
    store: Store,
    claim: Claim,
    error: Exception,
    kwargs: Any,
    *,
    cause: BaseException | None = None,
) -> Any:
    retryable = spec.retryable(error)
    # The backoff is stored on the row: no attempt may start before it, whatever the broker
    # delivers; the retry message below is only the reminder.
    delay = spec.backoff.delay(claim.attempt - 1)
    # Except under apply() / task_always_eager, where Celery re-runs the retry at once: there is
    # no broker to wait with, so no backoff is stored and the attempts follow each other.
    stored_delay = None if task.request.is_eager else delay

    def record() -> FailResult:
        try:
            return store.fail(
                claim.file_url, claim.token, error, retryable=retryable, retry_in=stored_delay
            )
        except errors.LostClaim:
            # After an outage the failure may have been recorded with only its reply lost.
            row = store.get(claim.file_url)
            if (
                row is None
                or row.token != claim.token
                or row.status
                not in (
                    Status.FAILED,
                    Status.DEAD,
                )
            ):
                raise
            return FailResult(row.status, row.attempt, row.max_attempts, retry_in=delay)

    try:
        outcome = wait_for_store(record, f"recording the failure of {claim.file_url}")
    except errors.LostClaim:
        return _skipped(claim.file_url, "claim lost to a newer execution; failure not recorded")
    if outcome.status is Status.FAILED:
        raise task.retry(
            exc=error,
            # measured by the database after it wrote retry_at, plus a little: never early
            countdown=(outcome.retry_in if outcome.retry_in is not None else delay) + 0.05,
            max_retries=None,
            kwargs=kwargs,
        ) from (cause or error)
    raise errors.FileDead(
        f"{claim.file_url} is dead after attempt {outcome.attempt} of {outcome.max_attempts}: "
        f"{type(error).__name__}: {masking.scrub(str(error))}",
        url=claim.file_url,
        attempt=outcome.attempt,
    ) from (cause or error)


def checkpointed(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    app: Any = None,
    file_type: str = "unknown",
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    dont_retry_on: tuple[type[BaseException], ...] = (),
    backoff: float | Backoff = 2.0,
    backoff_max: float = 300.0,
    soft_time_limit: float | None = DEFAULT_SOFT_TIME_LIMIT,
    time_limit: float | None = None,
    **task_options: Any,
) -> Any:
    """Turn `fn(file_url, ..., *, checkpoint=None)` into a checkpointed Celery task.

    `soft_time_limit` (an hour by default; None: none): past it the function gets
    SoftTimeLimitExceeded and the attempt fails ("time limit"), retried like any failure.
    `time_limit` (default: the soft limit plus a minute): past it the pool kills the process
    and the attempt is recorded lost.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")

    def wrap(func: Callable[..., Any]) -> Any:
        from pipeline.worker.celery_app import app as default_app

        target = app or default_app
        spec = Spec(
            file_type=file_type,
            max_attempts=max_attempts,
            lease_seconds=float(lease_seconds),
            retry_on=tuple(retry_on),
            dont_retry_on=tuple(dont_retry_on),
            backoff=backoff if isinstance(backoff, Backoff) else Backoff(backoff, backoff_max),
            wants_checkpoint="checkpoint" in inspect.signature(func).parameters,
        )
        options = {
            # The crash-safe options (see pipeline/worker/celeryconfig.py for why each).
            "acks_late": True,
            "reject_on_worker_lost": True,
            "serializer": "json",
            "max_retries": None,
            "Request": CheckpointRequest,
            "soft_time_limit": soft_time_limit,
            "time_limit": (
                time_limit
                if time_limit is not None or soft_time_limit is None
                else soft_time_limit + HARD_LIMIT_GRACE
            ),
            **task_options,
        }

        @functools.wraps(func)
        def body(self: Task, file_url: str, *args: Any, **kwargs: Any) -> Any:
            return run(self, func, spec, file_url, args, kwargs)

        task = target.task(
            name=name or f"{func.__module__}.{func.__qualname__}", bind=True, **options
        )(body)
        task.checkpoint_spec = spec
        return task

    return wrap(fn) if fn is not None else wrap
