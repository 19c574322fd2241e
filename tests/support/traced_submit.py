"""Send one task per URL through pipeline's Sender with tracing on, in a process of its own
(a tracer provider is set once per process: the test's own stays untraced), and write the
spans the SDK's in-memory exporter kept, as tests/support/span_capture.py does.

    python -m tests.support.traced_submit OUT.jsonl TASK URL...

The broker and queue are PIPELINE_BROKER_URL and PIPELINE_QUEUE, as for `pipeline submit`.
A `batch` span is current while sending, as an application's would be.
"""

from __future__ import annotations

import json
import sys

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pipeline.sender import Sender
from pipeline.worker.celery_app import app
from tests.support.span_capture import span_dict


def main() -> None:
    out, task, *urls = sys.argv[1:]
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    with trace.get_tracer("test").start_as_current_span("batch"), Sender(app) as sender:
        for url in urls:
            sender.send(task, url)
    with open(out, "w") as f:
        for span in exporter.get_finished_spans():
            f.write(json.dumps(span_dict(span)) + "\n")


if __name__ == "__main__":
    main()
