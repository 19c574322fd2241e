"""What to watch: intervals (`30s`, `5m`), PIPELINE_WATCH entries, and beat's schedule entries.

PIPELINE_WATCH (or `pipeline_watch` in a Celery config module) holds entries separated by
`;` or new lines, each `PATTERN EVERY [batch=NAME] [task=NAME]`, for example
`s3://bucket/in/**/*.jsonl 30s; /data/**/*.csv 1m batch=csv`. The pattern is everything
before the interval, so it may hold spaces; it cannot hold `;`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pipeline import errors, masking
from pipeline.sources import producer

WATCH_ENV = "PIPELINE_WATCH"
SCAN_TASK = "pipeline.watch_scan"
DEFAULT_BATCH = "watch"
# A scan a second is already more listing requests than object stores like; below it a
# typo (`30ms` for `30s`) would hammer the bucket.
MIN_INTERVAL = 1.0
MAX_INTERVAL = 7 * 86400.0

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_OPTION = re.compile(r"(batch|task)=(\S+)")


def parse_interval(text: str) -> float:
    """Seconds in `30`, `30s`, `1.5m`, `1h30m`, `2d`; InvalidInput saying why otherwise."""
    value = text.strip().lower()
    if not value:
        raise errors.InvalidInput("interval is empty (e.g. 30s, 5m, 1h)")
    try:
        seconds = float(value)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _PART.finditer(value):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos != len(value) or pos == 0:
            raise errors.InvalidInput(
                f"interval {text!r} is not a duration (e.g. 30s, 5m, 1h30m)"
            ) from None
    if not math.isfinite(seconds) or not MIN_INTERVAL <= seconds <= MAX_INTERVAL:
        raise errors.InvalidInput(
            f"interval {text!r} is out of range "
            f"({MIN_INTERVAL:g} s to {MAX_INTERVAL / 86400:g} days)"
        )
    return seconds


def format_interval(seconds: float) -> str:
    """`30s`, `5m`, `1h30m`: the shortest spelling parse_interval reads back."""
    if seconds % 60 or seconds < 60:
        return f"{seconds:g}s"
    minutes = int(seconds // 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")


@dataclasses.dataclass(frozen=True, slots=True)
class WatchSpec:
    """One watched pattern: scanned every `every` seconds, its files sent to `task_name`."""

    pattern: str
    every: float
    batch_id: str = DEFAULT_BATCH
    task_name: str = producer.DEFAULT_TASK

    def __post_init__(self) -> None:
        if not self.pattern.strip():
            raise errors.InvalidInput("pattern is empty")
        if masking.has_userinfo(self.pattern):
            raise errors.InvalidInput(
                f"pattern {masking.mask_invalid_url(self.pattern)} carries credentials: "
                "give them as fsspec storage options or configuration instead"
            )
        producer.check_name("batch", self.batch_id)
        producer.check_name("task", self.task_name)

    @property
    def shown(self) -> str:
        return f"{self.pattern} every {format_interval(self.every)}"


def parse_entry(text: str) -> WatchSpec:
    """One `PATTERN EVERY [batch=NAME] [task=NAME]` entry."""
    head, options = text.strip(), {}
    while True:
        parts = head.rsplit(None, 1)
        if len(parts) < 2:
            raise errors.InvalidInput("expected `PATTERN EVERY [batch=NAME] [task=NAME]`")
        head, last = parts
        if not (match := _OPTION.fullmatch(last)):
            break
        if match.group(1) in options:
            raise errors.InvalidInput(f"{match.group(1)}= given twice")
        options[match.group(1)] = match.group(2)
    # `head` is the pattern as written, inner spaces kept; `last` the interval.
    return WatchSpec(
        pattern=head,
        every=parse_interval(last),
        batch_id=options.get("batch", DEFAULT_BATCH),
        task_name=options.get("task", producer.DEFAULT_TASK),
    )


def parse(setting: str | Iterable[str | Mapping[str, Any]] | None) -> list[WatchSpec]:
    """Every entry of a PIPELINE_WATCH string, or of a `pipeline_watch` list whose items are
    such strings or dicts (`pattern`, `every`, optional `batch`, `task`).

    InvalidInput names the entry (1-based) and what is wrong with it.
    """
    if not setting:
        return []
    items: list[str | Mapping[str, Any]]
    if isinstance(setting, str):
        items = [e for e in re.split(r"[;\n]", setting) if e.strip()]
    else:
        items = list(setting)
    specs: list[WatchSpec] = []
    for number, item in enumerate(items, start=1):
        try:
            specs.append(_spec(item))
        except errors.InvalidInput as error:
            shown = masking.scrub(str(item).strip()[:200])
            raise errors.InvalidInput(
                f"{WATCH_ENV} entry {number} ({shown!r}): {error}", entry=number
            ) from None
    patterns = [s.pattern for s in specs]
    if dupes := sorted({p for p in patterns if patterns.count(p) > 1}):
        raise errors.InvalidInput(f"{WATCH_ENV}: pattern watched twice: {masking.scrub(dupes[0])}")
    return specs


def _spec(item: str | Mapping[str, Any]) -> WatchSpec:
    if isinstance(item, str):
        return parse_entry(item)
    if isinstance(item, Mapping):
        unknown = set(item) - {"pattern", "every", "batch", "task"}
        if unknown or "pattern" not in item or "every" not in item:
            raise errors.InvalidInput(
                "expected keys pattern, every and optionally batch, task"
                + (f" (unknown: {', '.join(sorted(map(str, unknown)))})" if unknown else "")
            )
        every = item["every"]
        return WatchSpec(
            pattern=str(item["pattern"]),
            every=parse_interval(str(every)),
            batch_id=str(item.get("batch", DEFAULT_BATCH)),
            task_name=str(item.get("task", producer.DEFAULT_TASK)),
        )
    raise errors.InvalidInput(f"expected a string or a dict, not {type(item).__name__}")


def beat_entries(specs: Iterable[WatchSpec]) -> dict[str, dict[str, Any]]:
    """A `beat_schedule` entry per spec, sending SCAN_TASK every `every` seconds."""
    return {
        f"pipeline-watch {spec.pattern}": {
            "task": SCAN_TASK,
            "schedule": spec.every,
            "kwargs": {
                "pattern": spec.pattern,
                "batch_id": spec.batch_id,
                "task_name": spec.task_name,
            },
            # A scan nobody took within its interval is dropped: the next one lists the
            # same prefix anew, and scans must not pile up behind a stopped fleet.
            "options": {"expires": spec.every},
        }
        for spec in specs
    }
