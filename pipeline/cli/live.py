"""What a command shows while it works: a submit's live count and report, the bar of --wait."""

from __future__ import annotations

import contextlib
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from pipeline.cli.display import records_so_far, unfinished
from pipeline.interrupts import Interrupts
from pipeline.models import Status
from pipeline.sender import Sender
from pipeline.sources import producer
from pipeline.store import Registry, Reports
from pipeline.views import Overview

err = Console(stderr=True)


def submit(
    store: Registry,
    request: producer.Request,
    sender: Sender,
    interrupts: Interrupts | None = None,
) -> producer.SubmitReport:
    """Register and enqueue `request` under a live count, then print what was done.

    `interrupts`: the caller's, installed; without it one is installed for the submit (a
    signal then stops it after the chunk in hand, as in `pipeline submit`).
    """
    own = interrupts is None
    flag = Interrupts() if interrupts is None else interrupts
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
        tid = bar.add_task(escape(request.batch_id), seen=0, enqueued=0)
        report = producer.submit_request(
            store,
            request,
            sender.send,
            progress=lambda r: bar.update(tid, seen=r.seen, enqueued=r.enqueued),
            interrupts=flag,
        )
    print_submit_report(report, request.batch_id)
    return report


def print_submit_report(report: producer.SubmitReport, batch_id: str) -> None:
    """The refused lines, the batch's counts, and where an interrupted submit stopped."""
    for line, text, reason in report.refused:
        err.print(f"[yellow]refused[/yellow] line {line}: {escape(reason)}: {escape(repr(text))}")
    if report.refused_count > len(report.refused):
        err.print(f"... and {report.refused_count - len(report.refused)} more refused lines")
    err.print(
        f"batch [bold]{escape(batch_id)}[/bold]: {report.seen} files, {report.enqueued} enqueued, "
        f"{report.completed_before} already completed, {report.dead_before} already dead, "
        f"{report.in_flight_before} already in flight, {report.refused_count} refused"
    )
    if report.held:
        err.print(
            f"{report.held} files held by the batch's limit: each is sent when one of its "
            "files ends"
        )
    if report.interrupted:
        err.print(
            f"[yellow]interrupted[/yellow] by {report.interrupted}: the input up to line "
            f"{report.last_line} of its source was submitted, nothing after it; every file "
            "registered has its task (submit the same input again to go on)"
        )


class RateColumn(ProgressColumn):
    """The batch's files per second and the time left at that rate (task field `rate`).

    The rate is the batch's own, from the database (files finished over its running time),
    so a short batch shows one too and the end estimate uses the whole run, not the last poll.
    """

    def render(self, task: Task) -> Text:
        rate = task.fields.get("rate")
        if not rate:
            return Text("-- files/s, eta --:--")
        left = 0.0 if task.total is None else max(0.0, task.total - task.completed) / rate
        minutes, seconds = divmod(round(left), 60)
        return Text(f"{rate:.1f} files/s, eta {minutes}:{seconds:02d}")


def follow(
    store: Reports,
    batch_id: str,
    *,
    timeout: float | None = None,
    poll: float = 0.5,
    interrupts: Interrupts | None = None,
) -> Overview:
    """Show a live progress bar until every file of the batch is completed or dead.

    A signal stops following: KeyboardInterrupt, raised once the bar is closed. It is acted
    on between polls, never inside the bar's refresh (pipeline.interrupts says why), except
    during a poll of the database, which it stops at once (the database may be unreachable).
    `interrupts`: the caller's, already installed; without it, Ctrl-C is caught here unless
    the caller has a SIGINT handler of its own.
    """
    own = interrupts is None
    flag = Interrupts() if interrupts is None else interrupts
    with flag.installed_over_default() if own else contextlib.nullcontext(flag):
        overview = _follow(store, batch_id, timeout, poll, flag)
    if flag.received:
        raise KeyboardInterrupt
    return overview


def _follow(
    store: Reports,
    batch_id: str,
    timeout: float | None,
    poll: float,
    interrupts: Interrupts,
) -> Overview:
    deadline = time.monotonic() + timeout if timeout else None
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[green]{task.fields[ok]} ok[/green] [red]{task.fields[dead]} dead[/red]"),
        TextColumn("{task.fields[running]} running"),
        TextColumn("{task.fields[records]} records"),
        RateColumn(),
        TimeElapsedColumn(),
        console=err,
    ) as bar:
        tid = bar.add_task(
            escape(batch_id), total=None, ok=0, dead=0, running=0, records="0", rate=None
        )
        while True:
            with interrupts.reading():
                overview = store.overview(batch_id)
            t = overview.totals()
            done = t[Status.COMPLETED] + t[Status.DEAD]
            seconds = overview.batch_seconds
            bar.update(
                tid,
                rate=done / seconds if done and seconds else None,
                total=sum(t.values()),
                completed=done,
                ok=t[Status.COMPLETED],
                dead=t[Status.DEAD],
                running=t[Status.PROCESSING],
                # the completed files' records and those of the chunks committed so far
                records=f"{records_so_far(overview):,}",
            )
            if not unfinished(overview):
                return overview
            if deadline is not None and time.monotonic() > deadline:
                err.print(f"[yellow]gave up waiting after {timeout:.0f}s[/yellow]")
                return overview
            interrupts.sleep(poll)
            if interrupts.received:
                return overview
