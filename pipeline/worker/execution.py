"""One delivery of a checkpointed task, from the claim to its outcome (Postgres decides).

What each situation does, and what Flower shows (the README's outcome table):
- first execution: claims, runs, completes (SUCCESS with the stats);
- a duplicate or redelivery of a done file: skips (SUCCESS, "already completed");
- another live execution holds the file: ends at once and schedules nothing; the holder
  finishes, or the sweep hands the file on when its lease ends (SUCCESS, "in progress
  elsewhere");
- a failed file whose backoff is not over (an early copy): ends at once; the retry message,
  or the sweep once it is overdue, brings it back (SUCCESS, "retry not due yet");
- the database unreachable before the claim: waits where it stands, holding its message,
  and claims when the database answers; not an attempt (STARTED until then);
- the database lost mid-execution: waits where it stands, then carries on under the same
  claim: runs the function again if its output transaction was broken (at most
  MAX_STARTS_PER_ATTEMPT starts; a start refused for disk, memory or connections is not
  counted), or reports the completion that had committed (STARTED, then SUCCESS);
- the database refuses the configuration (StoreMisconfigured): fails at once, said once a
  minute in the log; the row stays pending (FAILURE);
- the function raised, attempts left: records it with the time the next attempt is due and
  retries then (RETRY with the error);
- the cap reached or the error permanent: the file is dead (FAILURE, FileDead);
- its pool process SIGKILLed: the worker's main process releases the claim at once
  (hooks.CheckpointRequest) and the message is redelivered (the next attempt);
- a zombie whose claim was taken over: its writes are rolled back (SUCCESS, "claim lost");
- its batch cancelled: refused (SUCCESS, "batch cancelled"), or, running, stops after its next
  chunk commits; paused: refused (SUCCESS, "batch paused"), `resume` enqueues it again; at its
  batch's concurrency limit: held, no attempt spent (SUCCESS, "held by the batch's limit"), and
  sent again when one of the batch's files ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import Retry, SoftTimeLimitExceeded

from pipeline import errors, masking, tracing
from pipeline.models import Claim, ClaimResult, FailResult, Reason, Refusal, Stats, Status
from pipeline.store import ClaimPath, resume_tokens
from pipeline.worker import callbacks, runtime, trouble
from pipeline.worker.checkpoint import CheckpointContext, Chunk
from pipeline.worker.lease import Held, keeper
from pipeline.worker.options import Spec
from pipeline.worker.outage import Restarts, wait_for_store

logger = logging.getLogger("pipeline")


def _worker_id(task: Task) -> str:
    return f"{task.request.hostname or 'local'}:{os.getpid()}"


def _skipped(file_url: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {"file_url": file_url, "skipped": True, "reason": reason, **extra}


# A delivery that comes this close before its retry is due waits for it instead of being
# dropped (clock steps between worker and database, an ETA fired a hair early).
NOT_DUE_SLACK = 2.0


def run(
    task: Task, fn: Callable[..., Any], spec: Spec, file_url: str, args: Any, kwargs: Any
) -> Any:
    """One delivery: claim, run with heartbeat, complete or fail (Postgres decides)."""
    if masking.has_userinfo(file_url):
        # A message sent around `pipeline submit` (task.delay): never store nor show the secret.
        raise errors.InvalidURL(
            f"{masking.mask_url(file_url)} carries credentials: give them as storage options "
            "(environment or fsspec configuration), not in the URL",
            url=masking.mask_url(file_url),
        )
    # Tokens of claims an older message of this chain may still hold (pre-0.2 step-backs).
    resume = resume_tokens(kwargs.pop("_pipeline_resume", None)) or []
    store = tracing.claim_path(runtime.get_store())  # spans of claim, complete, fail if on
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

    try:
        if isinstance(result, Refusal):
            return _refused(task, spec, result, kwargs)
        return _execute(task, fn, spec, store, result, args, kwargs)
    finally:
        _report_trouble(task)


def _report_trouble(task: Task) -> None:
    """The database trouble this process saw, written for `pipeline status` once the
    database answers again (nothing to do, the common case, costs nothing)."""
    if not trouble.log.has_unreported():
        return
    try:
        trouble.report(runtime.get_store(), _worker_id(task))
    except Exception as error:  # still in trouble: the next delivery tries again
        logger.debug("database trouble not recorded yet: %s", error)


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
    if refusal.reason is Reason.CANCELLED:
        # Its batch was cancelled: the file is `cancelled`; `requeue` sends it again.
        return _skipped(refusal.file_url, "batch cancelled")
    if refusal.reason is Reason.PAUSED:
        # Held without spending an attempt; `resume` enqueues the batch's waiting files again,
        # so this message can go (keeping it would spin on the broker for the whole pause).
        return _skipped(refusal.file_url, "batch paused")
    if refusal.reason is Reason.LIMITED:
        # The batch runs as many files as its limit allows: the database holds this file (no
        # attempt spent) and the next of the batch's files to end sends it again, so this
        # message can go (kept, it would take its turn in the queue ahead of other batches).
        return _skipped(refusal.file_url, "held by the batch's limit")
    if refusal.reason is Reason.DEAD:
        raise errors.FileDead(f"{refusal.file_url} is dead: {refusal.error}", url=refusal.file_url)
    # A reason this code does not know must not be taken for "dead".
    raise errors.PipelineError(f"claim of {refusal.file_url} refused for {refusal.reason!r}")


def _execute(
    task: Task,
    fn: Callable[..., Any],
    spec: Spec,
    store: ClaimPath,
    claim: Claim,
    args: Any,
    kwargs: Any,
) -> Any:
    heartbeat = keeper.hold(store, claim)
    restarts = Restarts(store, claim)
    try:
        while restarts.another():
            try:
                return _run_once(
                    task, fn, spec, store, restarts.resume_from, heartbeat, args, kwargs
                )
            except errors.BatchCancelled:
                # Its batch was cancelled: the last chunk committed and the store moved the
                # file to `cancelled` with it (no attempt spent); requeue resumes it there.
                return _skipped(claim.file_url, "batch cancelled; stopped at a chunk")
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
                where = restarts.after(error)
                if isinstance(where, Stats):
                    # our completion had committed; only its reply was lost
                    return _completed(claim, where)
                if where is None:
                    logger.warning("claim on %s lost while the database was away", claim.file_url)
                    return _skipped(
                        claim.file_url, "claim lost while the database was away; output discarded"
                    )
        raise restarts.used_up()
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
    task: Task,
    fn: Callable[..., Any],
    spec: Spec,
    store: ClaimPath,
    claim: Claim,
    heartbeat: Held,
    args: Any,
    kwargs: Any,
) -> dict[str, Any]:
    """One start of the function under `claim`, completed in its output transaction."""
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            context = CheckpointContext(
                store, claim, stack, lost=heartbeat.lost, on_chunk=_progress_reporter(task, claim)
            )
            call_kwargs = dict(kwargs)
            if spec.wants_checkpoint:
                call_kwargs["checkpoint"] = context
            # Whatever the function raises goes out through its output transaction, rolled
            # back: a database error it met there is translated on the way (with its cause:
            # disk full, too many connections, ...), as are LostClaim and StoreUnavailable.
            result = fn(claim.file_url, *args, **call_kwargs)
            stats = Stats.coerce(result)
            if heartbeat.lost.is_set():
                raise errors.LostClaim(url=claim.file_url, token=claim.token)
            follow_up = store.complete(
                claim.file_url,
                claim.token,
                stats,
                processing_time_ms=int((time.monotonic() - started) * 1000),
                details=context.details or None,
                transaction=context.output_transaction,
            )
    except Exception as error:
        if not isinstance(error, errors.PipelineError) and store.unavailable(error):
            # A database error from the function's own connection: first line only
            # (SQLAlchemy appends the statement and its parameters), with any URL password
            # masked: this text reaches the logs and Flower.
            first = (str(error) or type(error).__name__).splitlines()[0]
            raise errors.StoreUnavailable(masking.scrub(first)) from error
        raise
    # Committed: output and 'completed' together (and the batch's callback row, if this was
    # its last file: sent now, not at the next sweep; or the next held file of its limited
    # batch).
    callbacks.send(task, follow_up)
    return _completed(claim, stats)


def _completed(claim: Claim, stats: Stats) -> dict[str, Any]:
    """The task's result for a file it completed."""
    return {"file_url": claim.file_url, "attempt": claim.attempt, **stats.as_dict()}


def _output_discarded(claim: Claim) -> dict[str, Any]:
    logger.warning("claim on %s lost; output discarded", claim.file_url)
    return _skipped(claim.file_url, "claim lost to a newer execution; output discarded")


def _progress_reporter(task: Task, claim: Claim) -> Callable[[Chunk], None]:
    """After each chunk: a PROGRESS state with its meta, as Celery users expect (stored by a
    result backend if there is one; Flower shows it from the task-progress event)."""

    def report(chunk: Chunk) -> None:
        meta = {
            "file_url": claim.file_url,
            "attempt": claim.attempt,
            "position": chunk.position,
            "records": chunk.stats.total,
            "progress_bytes": chunk.progress_bytes,
            "size_bytes": chunk.size_bytes,
        }
        try:
            task.update_state(state="PROGRESS", meta=meta)
            # Run in-process (apply, eager) there is no worker whose events anyone watches,
            # and a broker that does not answer held each chunk for a minute of retries.
            if not task.request.is_eager:
                task.send_event("task-progress", retry=False, **meta)
        except Exception:  # progress is for people watching: never the file's failure
            logger.debug("progress of %s not reported", claim.file_url, exc_info=True)

    return report


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
    store: ClaimPath,
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
        callbacks.send(task, outcome.follow_up)  # its limited batch's next held file, if any
        raise task.retry(
            exc=error,
            # measured by the database after it wrote retry_at, plus a little: never early
            countdown=(outcome.retry_in if outcome.retry_in is not None else delay) + 0.05,
            max_retries=None,
            kwargs=kwargs,
        ) from (cause or error)
    callbacks.send(task, outcome.follow_up)  # dead: its batch's callback, or next held file
    raise errors.FileDead(
        f"{claim.file_url} is dead after attempt {outcome.attempt} of {outcome.max_attempts}: "
        f"{type(error).__name__}: {masking.scrub(str(error))}",
        url=claim.file_url,
        attempt=outcome.attempt,
    ) from (cause or error)
