"""Submit: N new URLs registered and enqueued by the real CLI, against a raw enqueue loop.

Side A: `pipeline submit --from FILE --no-fingerprint` as a subprocess (fresh database, this
benchmark's Redis db, a unique queue). The paths in FILE do not exist: with --no-fingerprint
nothing is stat'ed, and without it a missing file only gets no fingerprint; either way every
line is registered and enqueued. Side B: `apply_async(..., producer=p)` in a loop on one
producer connection, same count, same broker, the same task (`pipeline.ingest`). No worker
runs: messages accumulate, and Redis db 11 is flushed between runs. The submit rate is N over
the subprocess's wall time (interpreter start included); the net figure subtracts the wall
time of `pipeline --help`, measured in the same rounds.

Then the same file is submitted again once every row is completed (one SQL UPDATE marks them
so): nothing may be enqueued, and it should take <= 5 % of the first submit's time.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psycopg

from bench import common

_SUMMARY = re.compile(r"(\d+) files, (\d+) enqueued")


def write_urls(path: str, n: int, run: str) -> None:
    with open(path, "w") as handle:
        for i in range(n):
            handle.write(f"/bench/submit/{run}/{i:07d}.jsonl\n")


def submit_cmd(path: str, batch: str) -> list[str]:
    return [common.pipeline_executable(), "submit", "--from", path, "--batch", batch,
            "--no-fingerprint"]  # fmt: skip


def enqueued_of(stderr: str) -> tuple[int, int]:
    found = _SUMMARY.search(stderr)
    if not found:
        raise RuntimeError(f"submit printed no summary:\n{stderr[-2000:]}")
    return int(found.group(1)), int(found.group(2))


def submit_side(n: int, tmp: str, extra: dict[str, Any]) -> float:
    """URLs/s of `pipeline submit`; also times the resubmit of the same file once completed."""
    run = uuid.uuid4().hex[:8]
    path = os.path.join(tmp, f"urls-{run}.txt")
    write_urls(path, n, run)
    queue = f"bench-submit-{run}"
    batch = f"bench-{run}"
    with common.fresh_database() as db:
        # Wide console: rich must not wrap the summary line we read back.
        env = common.env_for(db, queue, COLUMNS="500")
        common.flush_redis()
        took, proc = common.timed_run(submit_cmd(path, batch), env)
        seen, enqueued = enqueued_of(proc.stderr)
        assert (seen, enqueued) == (n, n), (seen, enqueued, n)
        assert common.queue_length(queue) == n, (common.queue_length(queue), n)
        common.flush_redis()

        with psycopg.connect(common.libpq_url(db), autocommit=True) as conn:
            updated = conn.execute(
                "UPDATE file_checkpoints SET status = 'completed', completed_at = now(),"
                " updated_at = now() WHERE batch_id = %s",
                (batch,),
            ).rowcount
        assert updated == n, (updated, n)
        again, proc = common.timed_run(submit_cmd(path, batch), env)
        seen2, enqueued2 = enqueued_of(proc.stderr)
        assert seen2 == n, (seen2, n)
        extra.setdefault("first_submit_s", []).append(took)
        extra.setdefault("resubmit_s", []).append(again)
        extra.setdefault("resubmit_enqueued", []).append(enqueued2 + common.queue_length(queue))
        common.flush_redis()
        help_took, _ = common.timed_run([common.pipeline_executable(), "--help"], env)
        extra.setdefault("help_s", []).append(help_took)
    os.unlink(path)
    return n / took


def raw_side(n: int) -> float:
    """URLs/s of apply_async in a loop on one producer connection."""
    from pipeline import app
    from pipeline.reference.task import ingest_file

    run = uuid.uuid4().hex[:8]
    queue = f"bench-raw-{run}"
    urls = [f"file:///bench/raw/{run}/{i:07d}.jsonl" for i in range(n)]
    common.flush_redis()
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=1)
        started = time.perf_counter()
        for url in urls:
            ingest_file.apply_async(args=[url], queue=queue, producer=producer)
        took = time.perf_counter() - started
    assert common.queue_length(queue) == n, (common.queue_length(queue), n)
    common.flush_redis()
    return n / took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--urls", type=int, default=100_000)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="A/B rounds (each ~2 x N / 1,000 s at ~1,000 msg/s: 1 round fits the budget)",
    )
    args = parser.parse_args()
    from pipeline import app

    app.conf.broker_url = common.REDIS_URL
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results = common.interleave(
            {
                "submit": lambda r: submit_side(args.urls, tmp, extra),
                "raw": lambda r: raw_side(args.urls),
            },
            args.rounds,
        )
    n = args.urls
    submit, raw = common.median(results["submit"]), common.median(results["raw"])
    ratio = submit / raw
    firsts, agains, starts = extra["first_submit_s"], extra["resubmit_s"], extra["help_s"]
    first, again, start = common.median(firsts), common.median(agains), common.median(starts)
    # Per round, then the median: net = minus that round's `pipeline --help` time.
    net_rates = [n / max(f - h, 1e-9) for f, h in zip(firsts, starts, strict=True)]
    net_rate = common.median(net_rates)
    share = common.median([a / f for a, f in zip(agains, firsts, strict=True)])
    net_share = common.median(
        [max(a - h, 0.0) / max(f - h, 1e-9) for a, f, h in zip(agains, firsts, starts, strict=True)]
    )
    net_again = common.median([max(a - h, 0.0) for a, h in zip(agains, starts, strict=True)])
    md = common.header(f"Submit: {n:,} new URLs, {args.rounds} round(s)")
    md += (
        "\n`pipeline submit --from FILE --no-fingerprint` (subprocess, wall time) against "
        "`apply_async(..., producer=p)` in a loop, same count, same Redis; no worker. Net = "
        f"minus `pipeline --help` ({common.ms(start)}, interpreter start and imports).\n\n"
    )
    md += common.table(
        ["side", "URLs/s median [min..max]", "ratio to raw"],
        [
            ["raw apply_async loop", common.spread(results["raw"]), "1.00"],
            ["pipeline submit (wall)", common.spread(results["submit"]), f"{ratio:.2f}"],
            [
                "pipeline submit (net of start-up)",
                common.spread(net_rates),
                f"{net_rate / raw:.2f}",
            ],
        ],
    )
    md += f"\nTarget submit/raw >= 0.80: {ratio:.2f} {common.verdict(ratio >= 0.80)}\n"
    enq = max(extra["resubmit_enqueued"])
    md += "\n" + common.table(
        ["resubmit of the same URLs, all completed", "value"],
        [
            ["first submit", f"{first:,.2f} s"],
            ["resubmit (wall)", f"{again:,.2f} s ({share:.1%} of the first)"],
            ["resubmit (net of start-up)", f"{net_again:,.2f} s ({net_share:.1%} of the first)"],
            ["messages enqueued by the resubmit", str(enq)],
        ],
    )
    md += (
        f"\nTarget resubmit enqueues nothing: {common.verdict(enq == 0)}; resubmit <= 5 % of "
        f"the first submit: {share:.1%} {common.verdict(share <= 0.05)} (wall), "
        f"{net_share:.1%} {common.verdict(net_share <= 0.05)} (net)\n"
    )
    common.save("submit", md, {"results": results, "urls": n, "rounds": args.rounds, **extra})


if __name__ == "__main__":
    main()
