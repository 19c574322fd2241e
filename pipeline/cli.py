"""The `pipeline` command line: submit, watch, status, requeue, reap, db, worker, demo."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import click
import kombu.exceptions
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from pipeline import (
    config,
    display,
    errors,
    lines,
    local,
    masking,
    producer,
    urls,
    watchspec,
    workers,
)
from pipeline.interrupts import Interrupts
from pipeline.models import Status
from pipeline.store import DEFAULT_WAITING_SECONDS, Store

err = Console(stderr=True)
out = Console()

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _open_store(*, broker: bool = False) -> Store:
    """The store on PIPELINE_DATABASE_URL, or on a private server when it is unset."""
    import pipeline

    try:
        local.ensure_services(broker=broker, notify=lambda m: err.print(f"[dim]{escape(m)}[/dim]"))
    # The private servers fail in their own ways (no `local` extra, a state folder that cannot
    # be written, pg_ctl or redis-server not starting): a clear message, not a traceback.
    except Exception as error:
        raise errors.PipelineError(
            f"could not start the private servers under {local.state_dir()}: {error}"
        ) from error
    _sync_app_broker()
    if broker:
        _check_broker_url()
    try:
        return pipeline.open_store(config.database_url())
    except errors.PipelineError as error:
        raise click.ClickException(
            masking.scrub(str(error), config.database_url(), config.broker_url())
        ) from error


def _check_broker_url() -> None:
    """A malformed broker URL is said so now, masked, not as a traceback mid-submit."""
    from pipeline.celery_app import app

    url = app.conf.broker_url
    try:
        # kombu parses the URL (scheme, host, port) when the connection is made, not sent.
        app.connection_for_write().as_uri()
    except Exception as error:
        raise errors.InvalidInput(
            f"invalid broker URL {masking.mask_invalid_url(url)}: {masking.scrub(str(error), url)}"
        ) from error


def _sync_app_broker() -> None:
    # The app read its settings at import; embedded mode may have set the URL since.
    from pipeline.celery_app import app

    if config.broker_url():
        app.conf.broker_url = config.broker_url()


@contextlib.contextmanager
def _handled() -> Iterator[None]:
    """Turn the project's errors into a clear message and exit status 1, never a traceback."""
    try:
        yield
    except errors.PipelineError as error:
        # escape(): user text (URLs, batch names) may hold "[...]", which rich reads as markup.
        message = masking.scrub(str(error), config.database_url(), config.broker_url())
        err.print(f"[red]error:[/red] {escape(message)}")
        raise SystemExit(EXIT_FAILED) from error
    except kombu.exceptions.OperationalError as error:
        # The broker went away while sending; rows already moved to pending are handed back
        # by the reaper once they have waited long enough.
        from pipeline.celery_app import app

        broker = config.mask_url(app.conf.broker_url)
        message = masking.scrub(str(error), app.conf.broker_url)
        err.print(f"[red]error:[/red] broker {escape(broker)}: {escape(message)}")
        raise SystemExit(EXIT_FAILED) from error


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipeline-exactly-once")
def main() -> None:
    """Exactly-once file processing on Celery and PostgreSQL.

    Configuration: PIPELINE_DATABASE_URL and PIPELINE_BROKER_URL. With neither set, private
    PostgreSQL and Redis servers are started under .pipeline/ (PIPELINE_STATE_DIR).
    """


# -- submit -----------------------------------------------------------------------------------


def _input_lines(urls: tuple[str, ...], from_file: str | None) -> Iterator[str | lines.Refused]:
    """Arguments as given; stdin and --from read in bounded lines (see pipeline.lines)."""
    for url in urls:
        if url == "-":
            stdin = getattr(sys.stdin, "buffer", None)
            if stdin is None:
                raise errors.InvalidInput("cannot read URLs from stdin: it is closed")
            yield from lines.read_lines(stdin)
        else:
            yield url
    if from_file:
        with open(from_file, "rb") as handle:
            yield from lines.read_lines(handle)


def _name(kind: str) -> Any:
    """A click callback refusing an unusable batch / task / file-type name at once."""

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None and (problem := producer.name_problem(kind, value)):
            raise click.BadParameter(problem)
        return value

    return check


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise click.BadParameter(f"{value} is not a number of seconds (finite, at least 0)")
    return value


def _registration_options(command: Any) -> Any:
    """--task, --file-type and --max-attempts: how submit and watch register the files."""
    for option in reversed(
        (
            click.option(
                "--task",
                "task_name",
                default=producer.DEFAULT_TASK,
                show_default=True,
                callback=_name("task"),
                help="checkpointed task to run",
            ),
            click.option(
                "--file-type", default="events", show_default=True, callback=_name("file type")
            ),
            click.option(
                "--max-attempts", type=click.IntRange(1, 100), default=3, show_default=True
            ),
        )
    ):
        command = option(command)
    return command


@main.command()
@click.argument("urls", nargs=-1)
@click.option(
    "--from", "from_file", type=click.Path(dir_okay=False), help="read URLs from FILE, one a line"
)
@click.option("--glob", "pattern", help="submit the files matching a glob on any fsspec filesystem")
@click.option(
    "--batch", "batch_id", callback=_name("batch"), help="batch name (default: a new one)"
)
@_registration_options
@click.option("--force", is_flag=True, help="run files again even if completed")
@click.option("--wait", is_flag=True, help="follow the batch until every file is done")
@click.option("--timeout", type=float, default=None, help="with --wait: give up after SECONDS")
@click.option("--no-fingerprint", is_flag=True, help="do not stat local files for change detection")
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
) -> None:
    """Register files and enqueue one task per file that is not already done.

    URLs come as arguments, from a file (--from), from stdin (-) or a glob (--glob). Exit
    status: 0 when every file completed, 1 when any ended dead or any input was refused.
    """
    if not urls and not from_file and not pattern:
        raise click.UsageError("give URLs, --from FILE, - for stdin, or --glob PATTERN")
    batch_id = batch_id or f"batch-{dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    # One handler from the first line read to the last poll: a signal is noted wherever it
    # lands, the submit's bar and the follow's bar included (pipeline.interrupts says why).
    interrupts = Interrupts()
    with _handled(), interrupts.installed():
        store = _open_store(broker=True)
        report = _submit(
            store,
            urls,
            from_file,
            pattern,
            batch_id,
            task_name,
            file_type,
            max_attempts,
            force,
            not no_fingerprint,
            interrupts,
        )
        if report.interrupted:
            raise SystemExit(128 + signal.Signals[report.interrupted].value)
        # Non-zero when any input was refused or any file is known to have ended dead (a
        # resubmission finds it so); with --wait, also when one ends dead now.
        status = EXIT_FAILED if report.refused_count or report.dead_before else EXIT_OK
        if task_name != producer.DEFAULT_TASK and report.enqueued:
            _warn_if_no_worker_has(task_name)
        if wait:
            try:
                overview = display.follow(store, batch_id, timeout=timeout, interrupts=interrupts)
            except KeyboardInterrupt:
                # Only the following stops: every file is registered and enqueued already.
                err.print(
                    f"[yellow]stopped following[/yellow] batch {escape(batch_id)}; its files "
                    f"go on (`pipeline status --batch {escape(batch_id)}`)"
                )
                raise SystemExit(interrupts.exit_status) from None
            display.print_overview(overview, batch_id)
            finished = overview.totals()
            if finished[Status.DEAD] or display.unfinished(overview):
                status = EXIT_FAILED
        raise SystemExit(status)


def _submit(
    store: Store,
    urls: tuple[str, ...],
    from_file: str | None,
    pattern: str | None,
    batch_id: str,
    task_name: str,
    file_type: str,
    max_attempts: int,
    force: bool,
    fingerprints: bool,
    interrupts: Interrupts | None = None,
) -> producer.SubmitReport:
    """Register and enqueue with a bar. `interrupts`: the caller's, installed; without it,
    one is installed here for the submit (the demo's case)."""
    from pipeline.celery_app import app

    sources: list[producer.Source] = []
    if urls or from_file:
        sources.append(
            producer.from_lines(_input_lines(urls, from_file), fingerprints=fingerprints)
        )
    if pattern:
        sources.append(producer.from_glob(pattern))
    send, close = _sender(app)
    report = producer.SubmitReport()
    own = interrupts is None
    flag = Interrupts() if interrupts is None else interrupts
    try:
        with (
            # Installed outside the bar, so the bar closes while a signal is only noted.
            flag.installed() if own else contextlib.nullcontext(flag),
            Progress(
                TextColumn("[bold]submit[/bold] {task.description}"),
                TextColumn("{task.fields[seen]} seen, {task.fields[enqueued]} enqueued"),
                TimeElapsedColumn(),
                console=err,
                transient=True,
            ) as bar,
        ):
            tid = bar.add_task(escape(batch_id), seen=0, enqueued=0)
            for source in sources:
                if report.interrupted:
                    break
                part = producer.submit(
                    store,
                    source,
                    send,
                    task_name=task_name,
                    batch_id=batch_id,
                    file_type=file_type,
                    max_attempts=max_attempts,
                    force=force,
                    progress=lambda r: bar.update(
                        tid, seen=report.seen + r.seen, enqueued=report.enqueued + r.enqueued
                    ),
                    interrupts=flag,
                )
                _merge(report, part)
                report.interrupted = part.interrupted
    except errors.PipelineError:
        raise
    except OSError as error:
        raise errors.PipelineError(f"submit stopped: {error}") from error
    finally:
        with contextlib.suppress(Exception):
            close()
    for line, text, reason in report.refused:
        err.print(f"[yellow]refused[/yellow] line {line}: {escape(reason)}: {escape(repr(text))}")
    if report.refused_count > len(report.refused):
        err.print(f"... and {report.refused_count - len(report.refused)} more refused lines")
    err.print(
        f"batch [bold]{escape(batch_id)}[/bold]: {report.seen} files, {report.enqueued} enqueued, "
        f"{report.completed_before} already completed, {report.dead_before} already dead, "
        f"{report.in_flight_before} already in flight, {report.refused_count} refused"
    )
    if report.interrupted:
        err.print(
            f"[yellow]interrupted[/yellow] by {report.interrupted}: the input up to line "
            f"{report.last_line} of its source was submitted, nothing after it; every file "
            "registered has its task (submit the same input again to go on)"
        )
    return report


def _warn_if_no_worker_has(task_name: str) -> None:
    """Warn when running workers answer and none of them has the task (rows would wait)."""
    from pipeline.celery_app import app

    try:
        replies = app.control.inspect(timeout=1.0).registered() or {}
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


def _merge(total: producer.SubmitReport, part: producer.SubmitReport) -> None:
    total.last_line = part.last_line or total.last_line
    for field in (
        "seen",
        "enqueued",
        "completed_before",
        "dead_before",
        "in_flight_before",
        "refused_count",
    ):
        setattr(total, field, getattr(total, field) + getattr(part, field))
    total.refused.extend(part.refused[: producer.MAX_REFUSED_KEPT - len(total.refused)])


# -- status -----------------------------------------------------------------------------------


@main.command()
@click.option("--batch", "batch_id", help="only this batch")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option(
    "--dead",
    "dead_limit",
    type=click.IntRange(0, 10_000),
    default=10,
    show_default=True,
    help="how many dead files to list",
)
def status(batch_id: str | None, as_json: bool, dead_limit: int) -> None:
    """Counts by status per batch, throughput, the oldest lease and the latest dead files."""
    with _handled():
        store = _open_store()
        overview = store.overview(batch_id, dead_limit=dead_limit)
    if as_json:
        click.echo(json.dumps(display.overview_json(overview), indent=2))
    else:
        display.print_overview(overview, batch_id)


# -- requeue / reap ---------------------------------------------------------------------------


@main.command()
@click.option("--dead", is_flag=True, help="dead files")
@click.option("--failed", is_flag=True, help="failed files")
@click.option("--url", "file_url", help="one file (normalised like submit)")
@click.option("--batch", "batch_id", help="only this batch")
@click.option("--force", is_flag=True, help="completed files too")
def requeue(
    dead: bool, failed: bool, file_url: str | None, batch_id: str | None, force: bool
) -> None:
    """Put files back to pending in a new generation of attempts, and enqueue them."""
    from pipeline import urls
    from pipeline.celery_app import enqueue

    chosen = [s for s, on in ((Status.DEAD, dead), (Status.FAILED, failed)) if on]
    if force:
        chosen.append(Status.COMPLETED)
    if not chosen and not file_url and not batch_id:
        raise click.UsageError("say what to requeue: --dead, --failed, --force, --url or --batch")
    with _handled():
        url = urls.normalize(file_url) if file_url else None
        store = _open_store(broker=True)
        work = store.requeue(url, batch_id=batch_id, statuses=chosen or None, force=force)
        sent = enqueue(work, default_task=producer.DEFAULT_TASK)
    click.echo(f"requeued {len(work)} files, enqueued {sent}")


# -- watch ------------------------------------------------------------------------------------


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
    callback=_name("batch"),
    help="batch of the files found",
)
@_registration_options
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
    from pipeline import metrics as exporter
    from pipeline import watch as watcher
    from pipeline.celery_app import app

    with _handled():
        if masking.has_userinfo(pattern):
            urls.normalize(pattern)  # refused, with the credentials masked
        store = _open_store(broker=True)
        send, close = _sender(app)
        collector = None
        if metrics_port is not None:
            try:
                collector = exporter.serve_watch(pattern, port=metrics_port, addr=metrics_addr)
            except OSError as error:
                raise errors.PipelineError(
                    f"cannot listen on {metrics_addr}:{metrics_port}: {error}"
                ) from error
        interrupts = Interrupts()

        def scan_once() -> watcher.ScanReport:
            return watcher.scan(
                store,
                pattern,
                send,
                task_name=task_name,
                batch_id=batch_id,
                file_type=file_type,
                max_attempts=max_attempts,
                interrupts=interrupts,
            )

        last: list[watcher.ScanReport] = []

        def on_scan(report: watcher.ScanReport) -> None:
            last[:] = [report]
            if collector is not None:
                collector.observe(report)
            colour = "yellow" if report.error else "dim" if not report.enqueued else "green"
            err.print(f"[{colour}]{escape(report.line())}[/{colour}]", soft_wrap=True)

        err.print(
            f"watching {escape(masking.scrub(pattern))} every "
            f"{watchspec.format_interval(every)} (batch {escape(batch_id)}, task "
            f"{escape(task_name)})"
        )
        try:
            with interrupts.installed():
                stopped = watcher.run(
                    scan_once, every, interrupts=interrupts, on_scan=on_scan, once=once
                )
        finally:
            with contextlib.suppress(Exception):
                close()
    if stopped:
        err.print(f"stopped by {stopped}")
        raise SystemExit(128 + signal.Signals[stopped].value)
    raise SystemExit(EXIT_OK if last and last[-1].ok else EXIT_FAILED)


def _sender(app: Any) -> tuple[Any, Any]:
    """producer.celery_sender, its broker errors as the project's own."""
    try:
        return producer.celery_sender(app)
    except Exception as error:  # kombu raises its own errors when the broker is down
        broker = app.conf.broker_url
        raise errors.PipelineError(
            f"broker {config.mask_url(broker)} unreachable: {masking.scrub(str(error), broker)}"
        ) from error


@main.command()
@click.option(
    "--waiting-seconds",
    type=float,
    callback=_finite,
    default=DEFAULT_WAITING_SECONDS,
    show_default=True,
    help="re-enqueue pending/failed files that waited longer than this",
)
def reap(waiting_seconds: float) -> None:
    """Move expired claims on and re-enqueue files whose message was lost (the reaper, once)."""
    from pipeline.celery_app import reap_once

    with _handled():
        store = _open_store(broker=True)
        counts = reap_once(store, waiting_seconds=waiting_seconds)
    click.echo(
        f"reaped {counts['reaped']} files: {counts['enqueued']} re-enqueued, {counts['dead']} dead"
    )


# -- db ---------------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """The checkpoint schema."""


@db.command("upgrade")
@click.option("--database-url", help=f"overrides {config.DATABASE_URL_ENV}")
def db_upgrade(database_url: str | None) -> None:
    """Apply the schema migrations not yet applied (idempotent, safe to run concurrently)."""
    if database_url:
        os.environ[config.DATABASE_URL_ENV] = database_url
    with _handled():
        store = _open_store()
        try:
            applied = store.upgrade()
            version = store.schema_version()
        finally:
            store.close()
    where = config.mask_url(config.database_url())
    if applied:
        click.echo(f"applied {', '.join(applied)} to {where}; schema version {version}")
    else:
        click.echo(f"{where} is up to date; schema version {version}")


@db.command("shell", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("psql_args", nargs=-1, type=click.UNPROCESSED)
def db_shell(psql_args: tuple[str, ...]) -> None:
    """psql on the checkpoint database (the private server if no URL is set); args go to psql.

    For example: pipeline db shell -c 'SELECT count(*) FROM events'
    """
    with _handled():
        _open_store().close()
        try:
            argv, env = local.psql_command(config.database_url() or "", *psql_args)
        except RuntimeError as error:
            raise errors.PipelineError(str(error)) from error
    # A child, not exec: this process owns the private server (if it started it) and stops it
    # after psql; Ctrl-C belongs to psql (it cancels the query), so it is ignored here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(subprocess.call(argv, env=env))


@main.command()
@click.option("--port", type=click.IntRange(1, 65535), default=9808, show_default=True)
@click.option("--addr", default="0.0.0.0", show_default=True, help="address to listen on")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1, max=86_400),
    default=15.0,
    show_default=True,
    help="seconds between reads of the checkpoint table",
)
def metrics(port: int, addr: str, interval: float) -> None:
    """Serve Prometheus metrics of the checkpoint table on http://ADDR:PORT/metrics."""
    from pipeline import metrics as exporter

    with _handled():
        store = _open_store()
        try:
            _, stop = exporter.serve(store, port=port, addr=addr, interval=interval)
        except OSError as error:  # the port is taken, or not ours to bind
            raise errors.PipelineError(f"cannot listen on {addr}:{port}: {error}") from error
    where = config.mask_url(config.database_url())
    err.print(f"metrics of {where} on http://{addr}:{port}/metrics")
    # As PID 1 in a container a signal without a handler is ignored: stop cleanly on SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(3600):
            pass
    except KeyboardInterrupt:
        stop.set()


# -- worker / flower / demo -------------------------------------------------------------------


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(celery_args: tuple[str, ...]) -> None:
    """Run `celery -A pipeline worker` with pipeline's settings (and private servers if unset).

    With the service URLs set it becomes the Celery worker (same pid, so a supervisor's
    signals reach Celery itself); on private servers it stays their owner, passes every
    signal on to the worker, and stops the servers after it.
    """
    with _handled():
        _open_store(broker=True).close()
    if not local.started_here():
        workers.exec_worker(celery_args)
    raise SystemExit(workers.run_forwarding(workers.worker_command(*celery_args)))


@main.command()
@click.option("--port", type=int, default=5555, show_default=True)
@click.option(
    "--basic-auth",
    envvar=workers.FLOWER_AUTH_ENV,
    help=f"user:password [env {workers.FLOWER_AUTH_ENV}]",
)
@click.option("--no-auth", is_flag=True, help="serve without a password (local use only)")
def flower(port: int, basic_auth: str | None, no_auth: bool) -> None:
    """Start Flower on the configured broker, behind basic auth."""
    if not basic_auth and not no_auth:
        raise click.UsageError(
            f"set {workers.FLOWER_AUTH_ENV}=user:password (or --no-auth for local use)"
        )
    # Flower takes "user:password[,user:password...]"; an empty user or password (`admin:`)
    # would be accepted by Flower and let anyone in with it.
    for pair in (basic_auth or "").split(",") if basic_auth else ():
        user, colon, password = pair.partition(":")
        if not (user and colon and password):
            raise click.UsageError(
                f"{workers.FLOWER_AUTH_ENV} must be user:password with neither empty (each of a "
                "comma-separated list)"
            )
    with _handled():
        _open_store(broker=True).close()
    env = dict(os.environ)
    if basic_auth:
        # Passed through the environment, never argv: a command line is visible to every user.
        env[workers.FLOWER_AUTH_ENV] = basic_auth
    env.setdefault("FLOWER_TASKS_COLUMNS", workers.FLOWER_COLUMNS)
    # Signals (docker stop, a supervisor, Ctrl-C) are handed on to Flower: unhandled, they
    # would end only this wrapper and leave Flower serving the port as an orphan.
    raise SystemExit(workers.run_forwarding(workers.flower_command(port), env=env))


@main.command()
@click.option(
    "--files", "n_files", type=int, default=300, show_default=True, help="files in the sample batch"
)
@click.option("--workers", "n_workers", type=int, default=2, show_default=True)
@click.option(
    "--data", "data_dir", type=click.Path(file_okay=False), help="where to write the sample files"
)
@click.option(
    "--flower",
    "flower_port",
    type=int,
    help="also run Flower on 127.0.0.1:PORT (local only, no password) and keep everything up "
    "until Ctrl-C",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=600.0,
    show_default=True,
    help="give up (exit status 1) when the batch is not done after SECONDS",
)
def demo(
    n_files: int, n_workers: int, data_dir: str | None, flower_port: int | None, timeout: float
) -> None:
    """Generate a sample batch, run real workers on it, and show the outcome.

    Exit status 0 when the batch ran to the end, 1 when the demo gave up waiting, 128+N when
    stopped by signal N; everything it started is stopped either way.
    """
    from pipeline import demo as demo_

    with _handled():
        status = demo_.main(
            lambda: _open_store(broker=True),
            out=out,
            err=err,
            n_files=n_files,
            n_workers=n_workers,
            data_dir=data_dir,
            flower_port=flower_port,
            timeout=timeout,
            submit=_submit,
            follow=display.follow,
            show=display.print_overview,
        )
    raise SystemExit(status)


if __name__ == "__main__":  # pragma: no cover
    main()
