"""`pipeline prune`: parses the ages and calls the store (pipeline/store/postgres/prune.py)."""

from __future__ import annotations

import re

import click

from pipeline.cli.group import handled, main, services

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def _age(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    match = _AGE.match(value.lower())
    if not match:
        raise click.BadParameter(f"{value!r} is not an age (e.g. 3600, 90m, 12h, 30d, 2w)")
    return float(match.group(1)) * _UNITS[match.group(2)]


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
