"""Spans of a real worker's pool processes, kept by the SDK's in-memory exporter and written
out for the test after each task (PIPELINE_TASK_MODULES=...,tests.support.span_capture).

The worker runs with PIPELINE_TRACING=1 and OTEL_TRACES_EXPORTER=none: pipeline.tracing makes
the tracer provider itself after the fork (worker_process_init); this module's own handler,
connected after pipeline's, adds the in-memory exporter to it. After each task the finished
spans go to PIPELINE_TEST_SPAN_DIR/<pid>.jsonl, one JSON object a line (`span_dict`).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from celery import signals
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import pipeline.tracing  # noqa: F401  (its worker_process_init handler is connected first)

EXPORTER = InMemorySpanExporter()


def span_dict(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "trace_id": trace.format_trace_id(context.trace_id),
        "span_id": trace.format_span_id(context.span_id),
        "parent_id": trace.format_span_id(span.parent.span_id) if span.parent else None,
        "kind": span.kind.name,
        "attributes": dict(span.attributes or {}),
        "links": [trace.format_trace_id(link.context.trace_id) for link in span.links],
        "pid": span.resource.attributes.get("process.pid"),
        "status": span.status.status_code.name,
    }


def _after_fork(**_: Any) -> None:
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), f"pipeline made no provider: {provider!r}"
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))


def _dump(**_: Any) -> None:
    spans = EXPORTER.get_finished_spans()
    EXPORTER.clear()
    out = pathlib.Path(os.environ["PIPELINE_TEST_SPAN_DIR"]) / f"{os.getpid()}.jsonl"
    with out.open("a") as f:
        for span in spans:
            f.write(json.dumps(span_dict(span)) + "\n")


signals.worker_process_init.connect(_after_fork, weak=False)
signals.task_postrun.connect(_dump, weak=False)
