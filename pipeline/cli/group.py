"""The `pipeline` command group: the services built once for a command, the way errors are
shown, and the options several commands share."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import click
import kombu.exceptions
from rich.console import Console
from rich.markup import escape

from pipeline import errors, masking
from pipeline.cli.services import Services
from pipeline.sources import producer

err = Console(stderr=True)
out = Console()

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# A configuration the database refuses exits like a usage error: fix it, do not retry.
EXIT_CONFIG = EXIT_USAGE


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipeline-exactly-once")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Exactly-once file processing on Celery and PostgreSQL.

    Configuration: PIPELINE_DATABASE_URL and PIPELINE_BROKER_URL. With neither set, private
    PostgreSQL and Redis servers are started under .pipeline/ (PIPELINE_STATE_DIR).
    """
    services = Services(notify=lambda message: err.print(f"[dim]{escape(message)}[/dim]"))
    ctx.obj = services
    ctx.call_on_close(services.close)


def services() -> Services:
    """The services of the command being run."""
    found = click.get_current_context().find_object(Services)
    assert found is not None, "a command of the `pipeline` group"
    return found


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """The project's errors as a clear message and exit status 1 (2 for a configuration the
    database refuses), never a traceback; no password in it."""
    try:
        yield
    except errors.StoreMisconfigured as error:
        # The configuration is wrong (PIPELINE_DATABASE_URL): exit at once, status 2.
        message = masking.scrub(str(error), *services().secrets())
        err.print(f"[red]error:[/red] {escape(message)}")
        raise SystemExit(EXIT_CONFIG) from error
    except errors.PipelineError as error:
        # escape(): user text (URLs, batch names) may hold "[...]", which rich reads as markup.
        message = masking.scrub(str(error), *services().secrets())
        err.print(f"[red]error:[/red] {escape(message)}")
        raise SystemExit(EXIT_FAILED) from error
    except kombu.exceptions.OperationalError as error:
        # The broker went away under Celery's own calls (a ping, an inspect; what the sender
        # sends is translated already): rows left pending are handed back by the sweep.
        broker = services().secrets()[1]
        message = masking.scrub(str(error), broker)
        err.print(f"[red]error:[/red] broker {escape(masking.mask_url(broker))}: {escape(message)}")
        raise SystemExit(EXIT_FAILED) from error


def name_check(kind: str) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    """A click callback refusing an unusable batch / task / file-type name at once."""

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None and (problem := producer.name_problem(kind, value)):
            raise click.BadParameter(problem)
        return value

    return check


def finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise click.BadParameter(f"{value} is not a number of seconds (finite, at least 0)")
    return value


def registration_options(command: Any) -> Any:
    """--task, --file-type and --max-attempts: how submit and watch register the files."""
    for option in reversed(
        (
            click.option(
                "--task",
                "task_name",
                default=producer.DEFAULT_TASK,
                show_default=True,
                callback=name_check("task"),
                help="checkpointed task to run",
            ),
            click.option(
                "--file-type",
                default="events",
                show_default=True,
                callback=name_check("file type"),
            ),
            click.option(
                "--max-attempts", type=click.IntRange(1, 100), default=3, show_default=True
            ),
        )
    ):
        command = option(command)
    return command
