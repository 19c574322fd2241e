"""Sample input for `pipeline demo` and the tests: a deterministic batch of event files.

The batch mixes `.jsonl`, `.csv` and `.jsonl.gz` files, puts a malformed record on every
`malformed_every`-th line, and makes one file (chosen by the seed) poison: binary bytes that
are not UTF-8, so its task must end `dead` while the rest of the batch completes.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
import pathlib
import random
from typing import Any

EXTENSIONS = (".jsonl", ".csv", ".jsonl.gz")
EVENT_TYPES = ("click", "view", "purchase", "signup")
CITIES = ("Berlin", "Zürich", "São Paulo", "Kraków", "Oslo", "Tōkyō")
# A fixed origin, not now(): the same seed must give the same bytes on any day.
_EPOCH = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
_CSV_COLUMNS = ("id", "ts", "type", "user", "city", "amount")


def make_batch(
    folder: pathlib.Path | str,
    n_files: int = 6,
    lines_per_file: int = 50,
    malformed_every: int | None = 10,
    seed: int = 0,
    *,
    poison: bool = True,
) -> list[pathlib.Path]:
    """Write n_files files into folder (one of them poison unless told not) and return them."""
    if n_files < 0 or lines_per_file < 0:
        raise ValueError("n_files and lines_per_file must not be negative")
    rng = random.Random(seed)
    target = pathlib.Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    poisoned = rng.randrange(n_files) if poison and n_files else None
    paths = []
    for index in range(n_files):
        extension = EXTENSIONS[index % len(EXTENSIONS)]
        if index == poisoned:
            path = target / f"part-{index:04d}-poison.jsonl"
            path.write_bytes(_poison(rng))
        else:
            path = target / f"part-{index:04d}{extension}"
            rows = [
                _row(rng, index, line, _is_malformed(line, malformed_every))
                for line in range(1, lines_per_file + 1)
            ]
            data = _csv(rows) if extension == ".csv" else _jsonl(rows)
            # mtime=0 keeps the gzip header, and so the file, identical across runs.
            path.write_bytes(gzip.compress(data, mtime=0) if extension.endswith(".gz") else data)
        paths.append(path)
    return paths


def _is_malformed(line: int, every: int | None) -> bool:
    return every is not None and every > 0 and line % every == 0


def _row(rng: random.Random, index: int, line: int, malformed: bool) -> dict[str, Any]:
    """One event as a dict; a malformed one says how in the `_defect` key."""
    ts = _EPOCH + dt.timedelta(seconds=rng.randrange(366 * 86400))
    row: dict[str, Any] = {
        "id": f"evt-{index:04d}-{line:06d}",
        "ts": ts.isoformat().replace("+00:00", "Z"),
        "type": rng.choice(EVENT_TYPES),
        "user": f"u{rng.randrange(1000):03d}",
        "city": rng.choice(CITIES),
        "amount": round(rng.uniform(0, 500), 2),
    }
    if malformed:
        row["_defect"] = rng.choice(("syntax", "no_id", "bad_ts", "no_type"))
    return row


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    lines = []
    for row in rows:
        defect = row.pop("_defect", None)
        if defect == "syntax":
            lines.append(json.dumps(row, ensure_ascii=False)[:-7])  # cut off mid-object
            continue
        if defect == "no_id":
            del row["id"]
        elif defect == "bad_ts":
            row["ts"] = "yesterday"
        elif defect == "no_type":
            del row["type"]
        lines.append(json.dumps(row, ensure_ascii=False))
    return "".join(line + "\n" for line in lines).encode("utf-8")


def _csv(rows: list[dict[str, Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    for row in rows:
        defect = row.pop("_defect", None)
        values = [str(row[column]) for column in _CSV_COLUMNS]
        if defect == "syntax":
            values = values[:3]  # a short row: fewer fields than the header
        elif defect == "no_id":
            values[0] = ""
        elif defect == "bad_ts":
            values[1] = "yesterday"
        elif defect == "no_type":
            values[2] = ""
        writer.writerow(values)
    return out.getvalue().encode("utf-8")


def _poison(rng: random.Random) -> bytes:
    # A NUL and an invalid UTF-8 lead byte up front, so the file is refused on line 1 either way.
    return b"\x00\xff\xfe" + rng.randbytes(4093)
