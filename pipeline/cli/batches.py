"""The commands about a batch as a whole: cancel, pause, resume."""

from __future__ import annotations

import click
from rich.markup import escape

from pipeline.cli.group import EXIT_FAILED, err, handled, main, services
from pipeline.models import BatchState
from pipeline.sources import producer


def _no_such_batch(name: str) -> None:
    err.print(f"[yellow]no such batch:[/yellow] {escape(name)}")
    raise SystemExit(EXIT_FAILED)


@main.command()
@click.option("--batch", "batch_id", required=True, help="the batch to cancel")
def cancel(batch_id: str) -> None:
    """Stop a batch: no claim of its files starts once this returns; files running stop at
    their next chunk or finish; the rest become `cancelled` (`requeue --batch` brings them
    back)."""
    with handled():
        cancelled = services().store().cancel_batch(batch_id)
    if cancelled is None:
        _no_such_batch(batch_id)
    click.echo(f"cancelled batch {batch_id}: {cancelled} waiting files cancelled")


@main.command()
@click.option("--batch", "batch_id", required=True, help="the batch to pause")
def pause(batch_id: str) -> None:
    """Hold a batch's claims (no attempt spent, the sweep hands none of its files out) until
    `pipeline resume`; files running go on."""
    with handled():
        state = services().store().pause_batch(batch_id)
    if state is None:
        _no_such_batch(batch_id)
    if state is not BatchState.PAUSED:
        err.print(f"[yellow]batch {escape(batch_id)} is {state}: not paused[/yellow]")
        raise SystemExit(EXIT_FAILED)
    click.echo(f"paused batch {batch_id}")


@main.command()
@click.option("--batch", "batch_id", required=True, help="the batch to resume")
def resume(batch_id: str) -> None:
    """Release a paused batch: its waiting files are enqueued again."""
    with handled():
        work = services().store().resume_batch(batch_id)
        if work is None:
            err.print(f"[yellow]batch {escape(batch_id)} is not paused[/yellow]")
            raise SystemExit(EXIT_FAILED)
        with services().sender() as sender:
            sent = sender.send_work(work, default_task=producer.DEFAULT_TASK)
    click.echo(f"resumed batch {batch_id}: {sent} files enqueued")
