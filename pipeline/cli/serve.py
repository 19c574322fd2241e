"""The commands that run something: db upgrade and shell, metrics, worker, flower, demo."""

from __future__ import annotations

import signal
import subprocess
import threading

import click

from pipeline import errors, masking, settings
from pipeline.cli import demo as demo_
from pipeline.cli import local, workers
from pipeline.cli.group import err, handled, main, out, services
from pipeline.ops import metrics as exporter


@main.group()
def db() -> None:
    """The checkpoint schema."""


@db.command("upgrade")
@click.option("--database-url", help=f"overrides {settings.DATABASE_URL.name}")
def db_upgrade(database_url: str | None) -> None:
    """Apply the schema migrations not yet applied (idempotent, safe to run concurrently)."""
    with handled():
        if database_url:
            services().use_database_url(database_url)
        store = services().store()
        applied = store.upgrade()
        version = store.schema_version()
    where = masking.mask_url(services().database_url())
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
    with handled():
        url, password = services().store().libpq_url()
        try:
            argv, env = local.psql_command(url, password, services().child_env(), *psql_args)
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
@click.option(
    "--window",
    type=click.FloatRange(min=60, max=86_400),
    default=exporter.DEFAULT_WINDOW,
    show_default=True,
    help="seconds the pipeline_window_* figures count over (the alert rules assume 900)",
)
@click.option(
    "--max-batches",
    type=click.IntRange(0, 1000),
    default=exporter.DEFAULT_MAX_BATCHES,
    show_default=True,
    help="how many of the most active batches get per-batch series",
)
def metrics(port: int, addr: str, interval: float, window: float, max_batches: int) -> None:
    """Serve Prometheus metrics of the checkpoint table on http://ADDR:PORT/metrics."""
    # As PID 1 in a container a signal without a handler is ignored: stop cleanly on SIGTERM.
    # Installed before the port is served: whoever sees it answer may signal at once.
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    with handled():
        store = services().store()
        try:
            _, stop = exporter.serve(
                store,
                port=port,
                addr=addr,
                interval=interval,
                window=window,
                max_batches=max_batches,
            )
        except OSError as error:  # the port is taken, or not ours to bind
            raise errors.PipelineError(f"cannot listen on {addr}:{port}: {error}") from error
    where = masking.mask_url(services().database_url())
    err.print(f"metrics of {where} on http://{addr}:{port}/metrics")
    try:
        while not stopping.wait(3600):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(celery_args: tuple[str, ...]) -> None:
    """Run `celery -A pipeline worker` with pipeline's settings (and private servers if unset).

    With the service URLs set it becomes the Celery worker (same pid, so a supervisor's
    signals reach Celery itself); on private servers it stays their owner, passes every
    signal on to the worker, and stops the servers after it.
    """
    with handled():
        services().database_url()
        services().app()  # the broker's URL, checked
    env = services().child_env()
    if not services().started:
        workers.exec_worker(celery_args, env)
    raise SystemExit(workers.run_forwarding(workers.worker_command(*celery_args), env=env))


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
    with handled():
        services().database_url()
        services().app()
    env = services().child_env()
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
    with handled():
        status = demo_.main(
            services(),
            demo_.Options(
                n_files=n_files,
                n_workers=n_workers,
                data_dir=data_dir,
                flower_port=flower_port,
                timeout=timeout,
            ),
            out=out,
            err=err,
        )
    raise SystemExit(status)
