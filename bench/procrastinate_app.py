"""The Procrastinate peer of the task-overhead benchmark: its app, its no-op job, its worker.

`python bench/procrastinate_app.py QUEUE` runs one worker (concurrency 2, the Celery rows'
`-c 2`) on QUEUE until the queue is empty and prints the seconds it took, timed from the
moment the worker starts fetching (the app already open, as a Celery worker is already up
when the benchmark adds its consumer) to the moment the last job's status is written.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import procrastinate

# The benchmark's own database for Procrastinate (created and dropped by bench_tasks.py).
CONNINFO = os.environ.get("PIPELINE_BENCH_PROCRASTINATE_DSN", "")
CONCURRENCY = 2

app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=CONNINFO))


@app.task(name="bench.procrastinate")
def noop(file_url: str) -> None:
    """The same no-op as the Celery rows (a plain function: Procrastinate runs it in a thread)."""


async def drain(queue: str) -> float:
    async with app.open_async():
        started = time.monotonic()
        await app.run_worker_async(
            queues=[queue],
            concurrency=CONCURRENCY,
            # stop once no job is left, rather than wait for more
            wait=False,
            install_signal_handlers=False,
        )
        return time.monotonic() - started


if __name__ == "__main__":
    print(f"{asyncio.run(drain(sys.argv[1])):.6f}")
