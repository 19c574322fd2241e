"""A trace per file (OpenTelemetry, the `pipeline-exactly-once[otel]` extra).

Spans: `pipeline.submit` where a task is sent for a file (a new trace per file, linked to
whatever span was current, e.g. a batch's), carried through the Celery message's headers to
the worker's `pipeline.task` (one delivery), inside which come `pipeline.claim`, the user's
`pipeline.function` and `pipeline.complete` (or `pipeline.fail`); a retry's message carries the
trace on. The trace id of each granted claim is kept on its attempt row (`pipeline status
--file URL` prints it).

Off unless a tracer provider is set: PIPELINE_TRACING=1 makes one (exporting as
OTEL_TRACES_EXPORTER says: otlp, the default, to OTEL_EXPORTER_OTLP_ENDPOINT; console; none),
in each pool process after the fork (`worker_process_init`, hooked in pipeline.worker.runtime:
an exporter's thread and socket do not survive a fork, and spans made in the parent would
carry its pid) and flushed when the process ends (`worker_process_shutdown`: pool processes
leave through os._exit, which runs no atexit handler). A provider the user set is used as it
is. Without the extra, or off, every hook here costs one look-up per call.

Imported by the worker and the producer, never importing either.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from pipeline import errors, masking, settings
from pipeline.models import Checkpoint, Claim, ClaimResult, FailResult, Stats, Status, Work
from pipeline.store import ClaimPath, OutputTransaction

# OpenTelemetry and celery.signals are imported only once tracing is on: every CLI command
# imports this module (through the sender), and the two cost it a few hundred milliseconds.

logger = logging.getLogger("pipeline")

T = TypeVar("T")
_OFF = contextlib.nullcontext()
_hooked = threading.Lock()
_publish_hooked = False


def active() -> bool:
    """Whether spans are recorded: a tracer provider is set (ours or the user's). Nobody can
    have set one without importing OpenTelemetry, so that is looked up, not imported."""
    api = sys.modules.get("opentelemetry.trace")
    if api is None:
        return False
    provider = api.get_tracer_provider()
    return not isinstance(provider, api.ProxyTracerProvider | api.NoOpTracerProvider)


def _hook_publish() -> None:
    """Every message sent under a span carries it from now on (once per process)."""
    global _publish_hooked
    with _hooked:
        if not _publish_hooked:
            from celery import signals

            signals.before_task_publish.connect(_inject, weak=False)
            _publish_hooked = True


def setup(service: str) -> bool:
    """Set a tracer provider up if PIPELINE_TRACING asks for one and none is set; True when
    spans are recorded afterwards."""
    if not settings.TRACING.get():
        return active()
    try:
        from opentelemetry import trace
    except ImportError:
        logger.warning(
            "%s is on but OpenTelemetry is not installed: pip install "
            "'pipeline-exactly-once[otel]'",
            settings.TRACING.name,
        )
        return False
    if active():  # the user's own (opentelemetry-instrument, their code): theirs stands
        return True
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    attributes: dict[str, Any] = {"process.pid": os.getpid()}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service
    provider = TracerProvider(resource=Resource.create(attributes))
    exporter = (os.environ.get("OTEL_TRACES_EXPORTER") or "otlp").strip().lower()
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter != "none":
        raise errors.InvalidInput(
            f"OTEL_TRACES_EXPORTER={exporter!r}: pipeline knows otlp, console and none"
        )
    trace.set_tracer_provider(provider)
    _hook_publish()
    return True


def after_fork() -> None:
    """In a pool process just forked (worker_process_init, see pipeline.worker.runtime)."""
    try:
        setup("pipeline-worker")
    except errors.PipelineError as error:  # a bad setting: said, and the worker runs untraced
        logger.warning("tracing not set up: %s", error)


def flush() -> None:
    """Before a pool process ends (worker_process_shutdown): it leaves through os._exit,
    which runs no atexit handler, so spans still batched would be lost."""
    if active():
        from opentelemetry import trace

        force_flush = getattr(trace.get_tracer_provider(), "force_flush", None)
        if force_flush is not None:
            force_flush(5000)


def _inject(headers: dict[str, Any] | None = None, **_: Any) -> None:
    # Every message sent under a span carries it: a submit's, and a retry sent by a delivery.
    if headers is None or not active():
        return
    from opentelemetry import propagate, trace

    if trace.get_current_span().get_span_context().is_valid:
        propagate.inject(headers)


def _tracer() -> Any:
    from opentelemetry import trace

    return trace.get_tracer("pipeline")


def _url(file_url: str) -> str:
    return masking.mask_url(file_url)


def submit(task_name: str, file_url: str) -> contextlib.AbstractContextManager[Any]:
    """Around sending one file's task: the root of that file's trace."""
    if not active():
        return _OFF
    from opentelemetry import trace

    _hook_publish()
    current = trace.get_current_span().get_span_context()
    span: contextlib.AbstractContextManager[Any] = _tracer().start_as_current_span(
        "pipeline.submit",
        context=trace.set_span_in_context(trace.INVALID_SPAN),  # a trace of its own
        kind=trace.SpanKind.PRODUCER,
        links=[trace.Link(current)] if current.is_valid else None,
        attributes={"pipeline.file_url": _url(file_url), "celery.task_name": task_name},
    )
    return span


def deliver(task: Any, file_url: str, run: Callable[[], T]) -> T:
    """`run()`, one delivery of `task` for `file_url`, in a span continuing the message's
    trace (or the span already current, e.g. a Celery instrumentation's)."""
    if not active():
        return run()
    from celery.exceptions import Retry
    from opentelemetry import propagate, trace

    _hook_publish()  # a retry's message carries the trace on
    parent = None
    if not trace.get_current_span().get_span_context().is_valid:
        fields = propagate.get_global_textmap().fields
        carrier = {k: v for k in fields if isinstance(v := getattr(task.request, k, None), str)}
        parent = propagate.extract(carrier)
    with _tracer().start_as_current_span(
        "pipeline.task",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        record_exception=False,
        set_status_on_exception=False,
        attributes={
            "pipeline.file_url": _url(file_url),
            "celery.task_name": task.name,
            "celery.task_id": task.request.id or "",
            "celery.retries": int(task.request.retries or 0),
        },
    ) as span:
        try:
            result = run()
        except BaseException as error:
            outcome = "retry" if isinstance(error, Retry) else type(error).__name__
            span.set_attribute("pipeline.outcome", outcome)
            if outcome != "retry":
                span.record_exception(error)
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)[:500]))
            raise
        if isinstance(result, Mapping):
            reason = result.get("reason") if result.get("skipped") else None
            span.set_attribute("pipeline.outcome", f"skipped: {reason}" if reason else "completed")
        return result


def function(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` (the user's function) run in a `pipeline.function` span when tracing is on."""

    def traced(*args: Any, **kwargs: Any) -> T:
        if not active():
            return fn(*args, **kwargs)
        with _tracer().start_as_current_span("pipeline.function"):
            return fn(*args, **kwargs)

    return traced


@contextlib.contextmanager
def _span(name: str, file_url: str, **attributes: Any) -> Iterator[Any]:
    with _tracer().start_as_current_span(
        name, attributes={"pipeline.file_url": _url(file_url), **attributes}
    ) as span:
        yield span


def claim_path(store: ClaimPath) -> ClaimPath:
    """`store` with its claim, completion and failure traced (itself when tracing is off)."""
    return TracedStore(store) if active() else store


class TracedStore:
    """A ClaimPath whose transitions are spans; a granted claim's trace id goes on its attempt
    row.

    A new transition of the execution goes here too, in a span around the store's call, as
    `complete` and `commit_chunk` below: mypy fails until it is here, since `claim_path`
    returns this class as a ClaimPath.
    """

    def __init__(self, store: ClaimPath) -> None:
        self._store = store

    def claim(
        self,
        file_url: str,
        worker_id: str,
        lease_seconds: float | None = None,
        *,
        max_attempts: int | None = None,
        file_type: str | None = None,
        task_name: str | None = None,
        task_id: str | None = None,
        resume_token: int | Sequence[int] | None = None,
        token: int | None = None,
    ) -> ClaimResult:
        with _span("pipeline.claim", file_url, **{"pipeline.worker": worker_id}) as span:
            result = self._store.claim(
                file_url,
                worker_id,
                lease_seconds,
                max_attempts=max_attempts,
                file_type=file_type,
                task_name=task_name,
                task_id=task_id,
                resume_token=resume_token,
                token=token,
            )
            if isinstance(result, Claim):
                span.set_attribute("pipeline.claim", "granted")
                span.set_attribute("pipeline.attempt", result.attempt)
                span.set_attribute("pipeline.token", result.token)
                self._record(result, span)
            else:
                span.set_attribute("pipeline.claim", str(result.reason))
            return result

    def _record(self, claim: Claim, span: Any) -> None:
        from opentelemetry import trace

        trace_id = trace.format_trace_id(span.get_span_context().trace_id)
        try:
            self._store.record_trace(claim.file_url, claim.token, trace_id)
        except Exception as error:  # the trace is for people; the file goes on without it
            logger.warning("trace id of %s not recorded: %s", _url(claim.file_url), error)

    def commit_chunk(
        self,
        file_url: str,
        token: int,
        position: Any,
        *,
        version: str | None = None,
        stats: Stats | None = None,
        progress_bytes: int | None = None,
        size_bytes: int | None = None,
        transaction: OutputTransaction | None = None,
    ) -> float:
        with _span("pipeline.chunk_commit", file_url, **{"pipeline.token": token}) as span:
            if stats is not None:
                span.set_attribute("pipeline.records", stats.total)
            return self._store.commit_chunk(
                file_url,
                token,
                position,
                version=version,
                stats=stats,
                progress_bytes=progress_bytes,
                size_bytes=size_bytes,
                transaction=transaction,
            )

    def restart(
        self, file_url: str, token: int, version: str | None, fingerprint: str | None = None
    ) -> int:
        with _span("pipeline.restart", file_url, **{"pipeline.token": token}):
            return self._store.restart(file_url, token, version, fingerprint)

    def complete(
        self,
        file_url: str,
        token: int,
        stats: Stats | Mapping[str, Any] | None = None,
        *,
        processing_time_ms: int | None = None,
        details: Mapping[str, Any] | None = None,
        transaction: OutputTransaction | None = None,
    ) -> Work | None:
        with _span("pipeline.complete", file_url, **{"pipeline.token": token}):
            return self._store.complete(
                file_url,
                token,
                stats,
                processing_time_ms=processing_time_ms,
                details=details,
                transaction=transaction,
            )

    def fail(
        self,
        file_url: str,
        token: int,
        error: BaseException | str,
        *,
        retryable: bool = True,
        retry_in: float | None = None,
    ) -> FailResult:
        with _span("pipeline.fail", file_url, **{"pipeline.token": token}) as span:
            result = self._store.fail(
                file_url, token, error, retryable=retryable, retry_in=retry_in
            )
            span.set_attribute("pipeline.status", str(result.status))
            return result

    # -- the rest as the store does it ------------------------------------------------------

    def reserve_token(self) -> int:
        return self._store.reserve_token()

    def heartbeat(self, file_url: str, token: int) -> float | None:
        return self._store.heartbeat(file_url, token)

    def abandon(self, file_url: str, worker_id: str, task_id: str | None) -> Status | None:
        return self._store.abandon(file_url, worker_id, task_id)

    def get(self, file_url: str, *, with_attempts: bool = False) -> Checkpoint | None:
        return self._store.get(file_url, with_attempts=with_attempts)

    def record_trace(self, file_url: str, token: int, trace_id: str) -> None:
        self._store.record_trace(file_url, token, trace_id)

    def transaction(
        self, *, token: int | None = None
    ) -> contextlib.AbstractContextManager[OutputTransaction]:
        return self._store.transaction(token=token)

    def unavailable(self, error: BaseException) -> bool:
        return self._store.unavailable(error)
