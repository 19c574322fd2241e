"""`pipeline demo`: a sample batch on real workers, followed to the end, then how to look at it.

Everything the demo starts (workers, their pool processes, Flower, and through the CLI's
exit handlers the private Redis and Postgres) stops when it ends, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from types import FrameType

from rich.console import Console
from rich.markup import escape

from pipeline import masking, settings
from pipeline.cli import display, live, local, workers
from pipeline.cli.services import Services
from pipeline.models import Status
from pipeline.reference import sample
from pipeline.sources import producer
from pipeline.worker import sweep

BATCH = "demo"
WAIT_SECONDS = 600.0
# Exit statuses: 0 the batch ran to the end (its one poison file is expected to be dead),
# 1 the demo gave up waiting or could not start, 128 + N stopped by signal N (the shell's
# convention).
EXIT_OK, EXIT_GAVE_UP = 0, 1
EVENTS_QUERY = "SELECT type, count(*) FROM events GROUP BY type ORDER BY 2 DESC"


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: unwinds the demo so that everything it started is stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise Stopped (once: a second one while stopping is ignored).

    Set explicitly: a process started in the background inherits SIGINT ignored, and an
    unhandled SIGTERM would end the process without its cleanup, orphaning the workers and
    leaving the private servers running.
    """

    def stop(signum: int, frame: FrameType | None) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def wait_for_stop() -> None:
    """Block until Ctrl-C or SIGTERM (inside stop_on_signals, which turns either into Stopped)."""
    while True:
        signal.pause()


def self_command() -> str:
    """How to run this very `pipeline` from a shell, as printed in the closing lines.

    `make demo` runs .venv/bin/pipeline, which is not on PATH unless the venv is active.
    """
    argv0 = pathlib.Path(sys.argv[0])
    if argv0.name == "pipeline" and argv0.exists():
        found = shutil.which("pipeline")
        if found and pathlib.Path(found).resolve() == argv0.resolve():
            return "pipeline"
        return shlex.quote(str(argv0.resolve()))
    return f"{shlex.quote(sys.executable)} -m pipeline.cli"


def closing_lines(services: Services, flower_port: int | None) -> list[str]:
    """The commands that show the result, each working as printed from any folder."""
    me = self_command()
    env = ""
    state = settings.STATE_DIR.name
    if services.started:
        # The private servers live in the state folder; the same folder finds them again.
        env = f"{state}={shlex.quote(str(local.state_dir()))} "
    fresh = f"{state}=$(mktemp -d) "
    # psql's own spelling of the database URL (no driver name; a password is never shown).
    where, password = services.store().libpq_url()
    if password:
        where = f"{masking.mask_url(where)} (password not shown)"
    lines = [
        "Look at the result:",
        f"  {env}{me} status --batch {BATCH}",
        f"  {env}{me} db shell -c {shlex.quote(EVENTS_QUERY)}",
        f"      (runs psql on {where}; the `events` table holds the valid records)",
    ]
    if flower_port:
        lines.append(f"  Flower: http://127.0.0.1:{flower_port}/tasks (until Ctrl-C)")
    else:
        lines += [
            f"  {fresh}{me} demo --flower 5555",
            "      (a new run with Flower on http://127.0.0.1:5555/tasks, until Ctrl-C)",
        ]
    lines.append(f"Run `{env}{me} demo` again to see every file recognised as done.")
    return lines


@dataclasses.dataclass(frozen=True)
class Options:
    """What `pipeline demo` was asked for."""

    n_files: int = 300
    n_workers: int = 2
    data_dir: str | None = None
    flower_port: int | None = None
    timeout: float = WAIT_SECONDS


def run(services: Services, options: Options, *, out: Console, err: Console) -> int:
    """The demo, from the schema to the closing lines; its exit status."""
    store = services.store()
    flower_port = options.flower_port
    applied = store.upgrade()
    if applied:
        err.print(f"schema: applied {', '.join(applied)}")
    logs = local.state_dir() / "logs"
    flower: subprocess.Popen[bytes] | None = None
    procs: list[subprocess.Popen[bytes]] = []
    app = services.app()
    try:
        if flower_port:
            # Started first: Flower shows only the task events it saw.
            flower = workers.start_flower(flower_port, logs, services.child_env())
            err.print(
                f"Flower on http://127.0.0.1:{flower_port}/tasks (log in {escape(str(logs))})"
            )
        folder = pathlib.Path(options.data_dir) if options.data_dir else None
        folder = folder or local.state_dir() / "demo-data"
        if not folder.exists() or not any(folder.iterdir()):
            paths = sample.make_batch(folder, n_files=options.n_files, lines_per_file=40, seed=7)
            err.print(
                f"wrote {len(paths)} sample files to {escape(str(folder))} "
                "(some malformed lines, one poison file)"
            )
        request = producer.Request(batch_id=BATCH, pattern=str(folder / "*"))
        with services.sender() as sender:
            report = live.submit(store, request, sender)
        if report.enqueued == 0 and report.in_flight_before == 0:
            out.print(
                f"[green]nothing to do:[/green] all {report.seen} files of batch "
                f"{BATCH!r} are already done"
            )
            display.print_overview(store.overview(BATCH), BATCH)
            _print_closing(out, services, flower_port)
            if flower_port:
                wait_for_stop()
            return EXIT_OK
        err.print(f"starting {options.n_workers} workers (logs in {escape(str(logs))})")
        procs = workers.start_workers(app, options.n_workers, logs, env=services.child_env())
        if report.in_flight_before and settings.BROKER_URL.name in services.started:
            # Rows left pending or processing by an earlier run that was stopped: their
            # messages may be lost with its private broker. Hand them out again now rather
            # than after the reaper's wait; a duplicate message costs one claim, nothing more.
            # (Only on the private servers: a shared table holds other people's rows too.)
            counts = sweep.reap_once(store, app, waiting_seconds=0)
            err.print(
                f"{report.in_flight_before} files left in flight by an earlier run: "
                f"{counts['enqueued']} re-enqueued"
            )
        overview = live.follow(store, BATCH, timeout=options.timeout)
        display.print_overview(overview, BATCH)
        totals = store.overview(BATCH).totals()
        unfinished = totals[Status.PENDING] + totals[Status.PROCESSING] + totals[Status.FAILED]
        if unfinished:
            err.print(
                f"[red]gave up:[/red] {unfinished} files still unfinished after "
                f"{options.timeout:.0f}s; worker logs in {escape(str(logs))}"
            )
            return EXIT_GAVE_UP
        _print_closing(out, services, flower_port)
        if flower_port:
            wait_for_stop()
        return EXIT_OK
    finally:
        workers.stop_workers(procs)
        if flower is not None:
            workers.stop_workers([flower])


def _print_closing(out: Console, services: Services, flower_port: int | None) -> None:
    out.print()
    for line in closing_lines(services, flower_port):
        out.print(escape(line), soft_wrap=True)


def main(services: Services, options: Options, *, out: Console, err: Console) -> int:
    """Run the demo (starting the private servers where no URL is set); stops on signals.

    The private servers themselves stop in the exit handlers that started them (local.py),
    once this returns and the workers are gone.
    """
    with stop_on_signals():
        try:
            try:
                return run(services, options, out=out, err=err)
            finally:
                services.close()
        except Stopped as stopped:
            err.print(f"[yellow]stopped by {stopped}[/yellow]: workers stopped, servers stopping")
            return 128 + stopped.signum
