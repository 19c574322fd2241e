"""Every PIPELINE_* setting in one place: its name, default, parser and why it exists.

A setting is read from the environment when asked, not once at import: the command line may
start private servers and set the URLs after this module was imported, and tests change the
environment between cases. Parsing happens here only; a value that does not parse is named
with the variable at fault.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from pipeline import errors

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Setting(Generic[T]):
    """One environment variable: unset or blank means `default`."""

    name: str
    default: T
    parse: Callable[[str], T]
    help: str

    def get(self, environ: Mapping[str, str] | None = None) -> T:
        raw = (os.environ if environ is None else environ).get(self.name, "").strip()
        if not raw:
            return self.default
        try:
            return self.parse(raw)
        except ValueError as error:
            raise errors.InvalidInput(f"{self.name}={raw!r} cannot be used: {error}") from None

    def is_set(self, environ: Mapping[str, str] | None = None) -> bool:
        return bool((os.environ if environ is None else environ).get(self.name, "").strip())


def _seconds(raw: str) -> float:
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError("not a finite number of seconds, at least 0")
    return value


def _positive_seconds(raw: str) -> float:
    value = _seconds(raw)
    if value == 0:
        raise ValueError("must be more than 0 seconds")
    return value


def _flag(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("not one of 1/0, true/false, yes/no, on/off")


def _modules(raw: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in raw.split(",") if m.strip())


def _optional(raw: str) -> str | None:
    return raw


def _optional_seconds(raw: str) -> float | None:
    return _seconds(raw)


_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw]?)$")
_AGE_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def parse_age(raw: str) -> float:
    """An age or a period in seconds: a number, or one with a unit (90m, 12h, 30d, 2w)."""
    match = _AGE.match(raw.strip().lower())
    if not match:
        raise ValueError(f"{raw!r} is not an age (e.g. 3600, 90m, 12h, 30d, 2w)")
    return float(match.group(1)) * _AGE_UNITS[match.group(2)]


def _optional_age(raw: str) -> float | None:
    return parse_age(raw)


def _positive_age(raw: str) -> float:
    value = parse_age(raw)
    if value == 0:
        raise ValueError("must be more than 0 seconds")
    return value


# -- where the services are ---------------------------------------------------------------------
DATABASE_URL = Setting[str | None](
    "PIPELINE_DATABASE_URL",
    None,
    _optional,
    "SQLAlchemy URL of the checkpoint database; unset, the CLI starts a private PostgreSQL",
)
DATABASE_DIRECT_URL = Setting[str | None](
    "PIPELINE_DATABASE_DIRECT_URL",
    None,
    _optional,
    "the same database without a pooler in between, for what needs a session (`db upgrade`); "
    "unset, PIPELINE_DATABASE_URL",
)


def _pooler(raw: str) -> str:
    value = raw.lower()
    if value not in POOLER_MODES:
        raise ValueError(f"not one of {', '.join(POOLER_MODES)}")
    return value


POOLER_MODES = ("none", "session", "transaction")
DATABASE_POOLER = Setting[str](
    "PIPELINE_DATABASE_POOLER",
    "none",
    _pooler,
    "what is between the store and Postgres: none, or a pooler (PgBouncer) in session or "
    "transaction mode; transaction turns the driver's prepared statements off",
)
DATABASE_TIMEOUT = Setting[float](
    "PIPELINE_DATABASE_TIMEOUT",
    10.0,
    _positive_seconds,
    "seconds a store call may take before the database counts as away (StoreUnavailable): "
    "connect, TCP keepalives and user timeout, statement timeout; about a third of the "
    "shortest lease (default 10 s, for the default lease of 30 s)",
)
DATABASE_IDLE_SECONDS = Setting[float](
    "PIPELINE_DATABASE_IDLE_SECONDS",
    30.0,
    _seconds,
    "a store whose connections went unused this long closes them (reopened on the next call); "
    "0 keeps them open",
)
BROKER_URL = Setting[str | None](
    "PIPELINE_BROKER_URL",
    None,
    _optional,
    "Celery broker URL; unset, the CLI starts a private Redis (a worker uses DEFAULT_BROKER)",
)
# What a worker started by hand connects to when PIPELINE_BROKER_URL is unset (Celery's own
# habit: a Redis on this host).
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
RESULT_BACKEND = Setting[str | None](
    "PIPELINE_RESULT_BACKEND",
    None,
    _optional,
    "Celery result backend; none by default: outcomes live in Postgres, Flower reads events",
)
STATE_DIR = Setting[pathlib.Path](
    "PIPELINE_STATE_DIR",
    pathlib.Path(".pipeline"),
    pathlib.Path,
    "where the private servers of the zero-setup path keep their data",
)

# -- the worker -----------------------------------------------------------------------------------
QUEUE = Setting[str]("PIPELINE_QUEUE", "pipeline", str, "the queue tasks are sent to and read from")
TASK_MODULES = Setting[tuple[str, ...]](
    "PIPELINE_TASK_MODULES",
    (),
    _modules,
    "comma-separated modules holding the user's tasks, imported by every worker",
)
SWEEP = Setting[bool](
    "PIPELINE_SWEEP",
    True,
    _flag,
    "run the sweep (reaper) inside this worker; 0 when beat or `pipeline reap` does it",
)
REAP_INTERVAL = Setting[float](
    "PIPELINE_REAP_INTERVAL",
    5.0,
    _positive_seconds,
    "seconds between two sweeps, in every worker and under beat",
)
REAP_WAITING_SECONDS = Setting[float | None](
    "PIPELINE_REAP_WAITING_SECONDS",
    None,
    _optional_seconds,
    "how long a pending row waits for its task before the sweep re-enqueues it "
    "(unset: 120 s, the store's default); set for beat, it travels with beat's message",
)
PRUNE_AFTER = Setting[float | None](
    "PIPELINE_PRUNE_AFTER",
    # Unset: the history stays until an operator runs `pipeline prune`. Attempt history is
    # what `status --file` and the metrics' windows read: how long to keep it is the
    # operator's call, so nothing is deleted unless asked.
    None,
    _optional_age,
    "the sweep deletes the history of attempts that ended longer ago than this (30d, 12h, "
    "seconds), each file's latest kept, as `pipeline prune --attempts-older-than` does; "
    "unset: never (completed files always stay)",
)
PRUNE_INTERVAL = Setting[float](
    "PIPELINE_PRUNE_INTERVAL",
    # An hour: the history grows by one row per ended attempt, and a prune that finds little
    # to delete still reads an index; the whole fleet prunes once per interval, not each worker.
    3600.0,
    _positive_age,
    "how often the sweep prunes (PIPELINE_PRUNE_AFTER): one worker of the fleet per interval",
)
TRACING = Setting[bool](
    "PIPELINE_TRACING",
    False,
    _flag,
    "OpenTelemetry traces (the otel extra): a tracer provider in each worker process and CLI, "
    "exporting as OTEL_TRACES_EXPORTER says (otlp by default)",
)
WATCH = Setting[str](
    "PIPELINE_WATCH",
    "",
    str,
    "patterns beat scans: `PATTERN EVERY [batch=NAME] [task=NAME]`, separated by ';'",
)


# -- the reference task --------------------------------------------------------------------------
def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


CHUNK_RECORDS = Setting[int](
    "PIPELINE_CHUNK_RECORDS",
    50_000,
    _positive_int,
    "the reference task commits a chunk every this many records (or CHUNK_BYTES)",
)
CHUNK_BYTES = Setting[int](
    "PIPELINE_CHUNK_BYTES",
    32 * 1024 * 1024,
    _positive_int,
    "... or every this many bytes of the file, whichever comes first",
)

ALL: tuple[Setting[Any], ...] = (
    DATABASE_URL,
    DATABASE_DIRECT_URL,
    DATABASE_POOLER,
    DATABASE_TIMEOUT,
    DATABASE_IDLE_SECONDS,
    BROKER_URL,
    RESULT_BACKEND,
    STATE_DIR,
    QUEUE,
    TASK_MODULES,
    SWEEP,
    REAP_INTERVAL,
    REAP_WAITING_SECONDS,
    PRUNE_AFTER,
    PRUNE_INTERVAL,
    TRACING,
    WATCH,
    CHUNK_RECORDS,
    CHUNK_BYTES,
)
