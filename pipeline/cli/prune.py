"""`pipeline prune`: parses the ages and calls the store (pipeline/store/postgres/prune.py)."""

from __future__ import annotations

import click

from pipeline import settings
from pipeline.cli.group import handled, main, services


def _age(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return settings.parse_age(value)  # the same ages as PIPELINE_PRUNE_AFTER takes
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@main.command()
@click.option(
    "--attempts-older-than",
    "attempts_age",
    default="30d",
    show_default=True,
    callback=_age,
    help="delete the history of attempts that ended longer ago than this",
)
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="but keep each file's latest attempts, this many",
)
@click.option(
    "--forget-completed-older-than",
    "forget_age",
    callback=_age,
    help="also forget files completed longer ago than this: a resubmission runs them again",
)
def prune(attempts_age: float, keep: int, forget_age: float | None) -> None:
    """Delete old attempt history; completed files stay (they make a resubmission a no-op)
    unless --forget-completed-older-than is given."""
    with handled():
        pruned = (
            services()
            .store()
            .prune(attempts_age, keep=keep, forget_completed_older_than=forget_age)
        )
    forgotten = f"; forgot {pruned.files} completed files" if forget_age is not None else ""
    click.echo(f"pruned {pruned.attempts} attempts{forgotten}")
