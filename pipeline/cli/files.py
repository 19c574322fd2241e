"""The commands about files: submit, watch, status, requeue, reap."""

from __future__ import annotations

import datetime as dt
import json
import secrets
import signal

import click
from rich.markup import escape

from pipeline import errors, masking
from pipeline.cli import display, fileview, live
from pipeline.cli.group import (
    EXIT_FAILED,
    EXIT_OK,
    err,
    finite,
    handled,
    main,
    name_check,
    registration_options,
    services,
)
from pipeline.interrupts import Interrupts
from pipeline.models import Status
from pipeline.ops import metrics as exporter
from pipeline.sources import producer, urls, watchspec
from pipeline.sources import watch as watcher
from pipeline.store import DEFAULT_WAITING_SECONDS
from pipeline.worker import sweep


@main.command()
@click.argument("urls", nargs=-1)
@click.option(
    "--from", "from_file", type=click.Path(dir_okay=False), help="read URLs from FILE, one a line"
)
@click.option("--glob", "pattern", help="submit the files matching a glob on any fsspec filesystem")
@click.option(
    "--batch", "batch_id", callback=name_check("batch"), help="batch name (default: a new one)"
)
@registration_options
@click.option("--force", is_flag=True, help="run files again even if completed")
@click.option("--wait", is_flag=True, help="follow the batch until every file is done")
@click.option("--timeout", type=float, default=None, help="with --wait: give up after SECONDS")
@click.option("--no-fingerprint", is_flag=True, help="do not stat local files for change detection")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="at most N files of this batch processing at once",
)
@click.option(
    "--on-complete",
    "on_complete",
    callback=name_check("task"),
    help="a Celery task to run once, when every file of the batch is completed or dead",
)
def submit(
    urls: tuple[str, ...],
    from_file: str | None,
    pattern: str | None,
    batch_id: str | None,
    task_name: str,
    file_type: str,
    max_attempts: int,
    force: bool,
    wait: bool,
    timeout: float | None,
    no_fingerprint: bool,
    concurrency: int | None,
    on_complete: str | None,
) -> None:
    """Register files and enqueue one task per file that is not already done.

    URLs come as arguments, from a file (--from), from stdin (-) or a glob (--glob). Exit
    status: 0 when every file completed, 1 when any ended dead or any input was refused.
    """
    if not urls and not from_file and not pattern:
        raise click.UsageError("give URLs, --from FILE, - for stdin, or --glob PATTERN")
    request = producer.Request(
        batch_id=batch_id or f"batch-{dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}",
        arguments=urls,
        from_file=from_file,
        pattern=pattern,
        task_name=task_name,
        file_type=file_type,
        max_attempts=max_attempts,
        force=force,
        fingerprints=not no_fingerprint,
        concurrency=concurrency,
        on_complete=on_complete,
    )
    # One handler from the first line read to the last poll: a signal is noted wherever it
    # lands, the submit's bar and the follow's bar included (pipeline.interrupts says why).
    interrupts = Interrupts()
    with handled(), interrupts.installed():
        store = services().store()
        with services().sender() as sender:
            report = live.submit(store, request, sender, interrupts)
        if report.interrupted:
            raise SystemExit(128 + signal.Signals[report.interrupted].value)
        # Non-zero when any input was refused or any file is known to have ended dead (a
        # resubmission finds it so); with --wait, also when one ends dead now.
        status = EXIT_FAILED if report.refused_count or report.dead_before else EXIT_OK
        if task_name != producer.DEFAULT_TASK and report.enqueued:
            _warn_if_no_worker_has(task_name)
        if wait:
            try:
                overview = live.follow(
                    store, request.batch_id, timeout=timeout, interrupts=interrupts
                )
            except KeyboardInterrupt:
                # Only the following stops: every file is registered and enqueued already.
                shown = escape(request.batch_id)
                err.print(
                    f"[yellow]stopped following[/yellow] batch {shown}; its files go on "
                    f"(`pipeline status --batch {shown}`)"
                )
                raise SystemExit(interrupts.exit_status) from None
            display.print_overview(overview, request.batch_id)
            totals = overview.totals()
            # A cancelled file did not complete either (its batch was cancelled meanwhile).
            if totals[Status.DEAD] or totals[Status.CANCELLED] or display.unfinished(overview):
                status = EXIT_FAILED
        raise SystemExit(status)


def _warn_if_no_worker_has(task_name: str) -> None:
    """Warn when running workers answer and none of them has the task (rows would wait)."""
    try:
        replies = services().app().control.inspect(timeout=1.0).registered() or {}
    except Exception:  # no answer from the broker: nothing to tell
        return
    if not replies:
        err.print(
            f"[yellow]warning:[/yellow] no worker answered within 1 s; cannot check that one "
            f"has task {escape(task_name)!r} (its files stay pending until one does)"
        )
    elif not any(task_name in (tasks or []) for tasks in replies.values()):
        err.print(
            f"[yellow]warning:[/yellow] none of the {len(replies)} running workers has task "
            f"{escape(task_name)!r}: its files stay pending until a worker that has it starts "
            "(PIPELINE_TASK_MODULES)"
        )


@main.command()
@click.option("--batch", "batch_id", help="only this batch")
@click.option("--file", "file_url", help="one file: its row and attempts, with their trace ids")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option(
    "--dead",
    "dead_limit",
    type=click.IntRange(0, 10_000),
    default=10,
    show_default=True,
    help="how many dead files to list",
)
def status(batch_id: str | None, file_url: str | None, as_json: bool, dead_limit: int) -> None:
    """Counts by status per batch, throughput, the oldest lease and the latest dead files;
    or, with --file, one file's row and every attempt (worker, times, outcome, trace id)."""
    if file_url is not None:
        _status_of_file(file_url, as_json)
        return
    with handled():
        overview = services().store().overview(batch_id, dead_limit=dead_limit)
    if as_json:
        click.echo(json.dumps(display.overview_json(overview), indent=2))
    else:
        display.print_overview(overview, batch_id)


def _status_of_file(file_url: str, as_json: bool) -> None:
    with handled():
        # As stored (a URL copied from a row or a task's arguments), else as submit writes it.
        row = services().store().get(file_url, with_attempts=True)
        if row is None:
            row = services().store().get(urls.normalize(file_url), with_attempts=True)
    if row is None:
        err.print(f"[yellow]no such file:[/yellow] {escape(masking.scrub(file_url))}")
        raise SystemExit(EXIT_FAILED)
    if as_json:
        click.echo(json.dumps(fileview.file_json(row), indent=2))
    else:
        fileview.print_file(row)


@main.command()
@click.option("--dead", is_flag=True, help="dead files")
@click.option("--failed", is_flag=True, help="failed files")
@click.option("--cancelled", is_flag=True, help="cancelled files (resumed where they stopped)")
@click.option("--url", "file_url", help="one file (normalised like submit)")
@click.option("--batch", "batch_id", help="only this batch")
@click.option("--force", is_flag=True, help="completed files too")
def requeue(
    dead: bool,
    failed: bool,
    cancelled: bool,
    file_url: str | None,
    batch_id: str | None,
    force: bool,
) -> None:
    """Put files back to pending in a new generation of attempts (cancelled ones as they
    stood, their batch open again), and enqueue them."""
    flags = ((Status.DEAD, dead), (Status.FAILED, failed), (Status.CANCELLED, cancelled))
    chosen = [s for s, on in flags if on]
    if force:
        chosen.append(Status.COMPLETED)
    if not chosen and not file_url and not batch_id:
        raise click.UsageError(
            "say what to requeue: --dead, --failed, --cancelled, --force, --url or --batch"
        )
    with handled():
        url = urls.normalize(file_url) if file_url else None
        with services().sender() as sender:
            work = (
                services()
                .store()
                .requeue(url, batch_id=batch_id, statuses=chosen or None, force=force)
            )
            sent = sender.send_work(work, default_task=producer.DEFAULT_TASK)
    click.echo(f"requeued {len(work)} files, enqueued {sent}")


@main.command()
@click.option(
    "--waiting-seconds",
    type=float,
    callback=finite,
    default=DEFAULT_WAITING_SECONDS,
    show_default=True,
    help="re-enqueue pending/failed files that waited longer than this",
)
def reap(waiting_seconds: float) -> None:
    """Move expired claims on and re-enqueue files whose message was lost (the reaper, once)."""
    with handled():
        counts = sweep.reap_once(
            services().store(), services().app(), waiting_seconds=waiting_seconds
        )
    click.echo(
        f"reaped {counts['reaped']} files: {counts['enqueued']} re-enqueued, {counts['dead']} dead"
    )


def _interval(ctx: click.Context, param: click.Parameter, value: str) -> float:
    try:
        return watchspec.parse_interval(value)
    except errors.InvalidInput as error:
        raise click.BadParameter(str(error)) from None


@main.command()
@click.argument("pattern")
@click.option(
    "--every",
    default="30s",
    show_default=True,
    callback=_interval,
    help="time between the starts of two scans (30s, 5m, 1h)",
)
@click.option(
    "--batch",
    "batch_id",
    default=watchspec.DEFAULT_BATCH,
    show_default=True,
    callback=name_check("batch"),
    help="batch of the files found",
)
@registration_options
@click.option("--once", is_flag=True, help="one scan, then exit (1 when it was skipped)")
@click.option(
    "--metrics-port", type=click.IntRange(1, 65535), help="serve the scans' Prometheus metrics"
)
@click.option("--metrics-addr", default="0.0.0.0", show_default=True)
def watch(
    pattern: str,
    every: float,
    batch_id: str,
    task_name: str,
    file_type: str,
    max_attempts: int,
    once: bool,
    metrics_port: int | None,
    metrics_addr: str,
) -> None:
    """Scan PATTERN (a glob on any fsspec filesystem) every --every; register what is new or
    changed and enqueue only that. One line per scan. Stops between scans on Ctrl-C or SIGTERM
    (exit 128 + the signal's number); a signal during a scan finishes the chunk in hand.
    """
    interrupts = Interrupts()
    last: list[watcher.ScanReport] = []
    with handled():
        if masking.has_userinfo(pattern):
            urls.normalize(pattern)  # refused, with the credentials masked
        store = services().store()
        with services().sender() as sender:
            collector = None
            if metrics_port is not None:
                try:
                    collector = exporter.serve_watch(pattern, port=metrics_port, addr=metrics_addr)
                except OSError as error:
                    raise errors.PipelineError(
                        f"cannot listen on {metrics_addr}:{metrics_port}: {error}"
                    ) from error

            def on_scan(report: watcher.ScanReport) -> None:
                last[:] = [report]
                if collector is not None:
                    collector.observe(report)
                colour = "yellow" if report.error else "dim" if not report.enqueued else "green"
                err.print(f"[{colour}]{escape(report.line())}[/{colour}]", soft_wrap=True)

            def scan_once() -> watcher.ScanReport:
                return watcher.scan(
                    store,
                    pattern,
                    sender.send,
                    task_name=task_name,
                    batch_id=batch_id,
                    file_type=file_type,
                    max_attempts=max_attempts,
                    interrupts=interrupts,
                )

            err.print(
                f"watching {escape(masking.scrub(pattern))} every "
                f"{watchspec.format_interval(every)} (batch {escape(batch_id)}, task "
                f"{escape(task_name)})"
            )
            with interrupts.installed():
                stopped = watcher.run(
                    scan_once, every, interrupts=interrupts, on_scan=on_scan, once=once
                )
    if stopped:
        err.print(f"stopped by {stopped}")
        raise SystemExit(128 + signal.Signals[stopped].value)
    raise SystemExit(EXIT_OK if last and last[-1].ok else EXIT_FAILED)
