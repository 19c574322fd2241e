"""Take the picture of the dashboard (docs/dashboard.png). Run by hand:

    .venv/bin/python tests/support/dashboard_screenshot.py [--out docs/dashboard.png]

Not part of the test suite. Grafana installs from neither Debian, PyPI nor npm here, so this
draws deploy/grafana/dashboards/pipeline.json itself: each panel where its gridPos puts it,
each target's query evaluated by a real Prometheus (Debian's `prometheus`) that scraped
`pipeline metrics` every second through a real run, then headless Chromium photographs the page.

The run (about three minutes): two prefork workers on a scratch database and Redis db 12 (as
tests/support/screenshot.py finds them), two batches of sleeping files with some that fail
twice and some dead, one worker SIGKILLed mid-batch (its leases expire and the sweep hands
its files on) and another started, then a quiet minute.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import pathlib
import re
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make `tests` and `pipeline` importable
    sys.path.insert(0, str(REPO))

from pipeline.ops import metrics  # noqa: E402
from tests.support import promql  # noqa: E402
from tests.support.processes import free_port  # noqa: E402
from tests.support.screenshot import chromium, scratch_database  # noqa: E402
from tests.support.workers import Cluster, app_on, redis_url_on_db  # noqa: E402

WIDTH = 1500
ROW = 30  # pixels per grid unit of height, as Grafana draws them
COLORS = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff", "#fade2a"]


def run(cluster: Cluster) -> None:
    """The traffic the picture shows."""
    first = cluster.start_worker(concurrency=2)
    cluster.start_worker(concurrency=2)
    batch = [f"s3://invoices/2024/{n:03d}.csv?sleep=0.5" for n in range(300)]
    batch += [f"s3://invoices/2024/flaky-{n}.csv?raise_until=3" for n in range(8)]
    batch += [f"s3://invoices/2024/broken-{n}.csv?permanent=1" for n in range(3)]
    cluster.store.register(batch, batch_id="invoices-2024", task_name="tests.sink")
    for url in batch:
        cluster.send(url)
    time.sleep(20)
    clicks = [f"s3://clicks/eu/{n:04d}.jsonl?sleep=0.3" for n in range(400)]
    clicks += [f"s3://clicks/eu/corrupt-{n}.jsonl?permanent=1" for n in range(4)]
    cluster.store.register(clicks, batch_id="clicks-eu", task_name="tests.sink")
    for url in clicks:
        cluster.send(url)
    time.sleep(15)
    first.signal_group(signal.SIGKILL)  # mid-batch: its leases expire, the sweep hands them on
    time.sleep(20)
    cluster.start_worker(concurrency=2)
    cluster.wait_all_terminal(len(batch) + len(clicks), timeout=600)
    time.sleep(45)


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or "(none)"


def human(value: float, unit: str | None) -> str:
    if value != value:  # NaN
        return "-"
    if unit == "s":
        if value >= 3600:
            return f"{value / 3600:.1f} h"
        if value >= 60:
            return f"{value / 60:.1f} min"
        return f"{value:.2f} s" if value < 10 else f"{value:.0f} s"
    if unit == "percentunit":
        return f"{value * 100:.0f}%"
    return f"{value:.2f}" if abs(value) < 10 and value != int(value) else f"{value:,.0f}"


def timeseries_svg(
    series: list[tuple[str, list[tuple[float, float]]]],
    w: int,
    h: int,
    unit: str | None,
    start: float,
    end: float,
) -> str:
    points = [v for _, data in series for _, v in data if v == v]
    top = max(points, default=1.0) or 1.0
    pad_left, pad_bottom = 58, 18
    pw, ph = w - pad_left - 8, h - pad_bottom - 6
    parts = [f'<svg width="{w}" height="{h}">']
    for frac in (0, 0.5, 1):
        y = 6 + ph * (1 - frac)
        parts.append(f'<line x1="{pad_left}" x2="{w - 8}" y1="{y}" y2="{y}" class="grid"/>')
        parts.append(
            f'<text x="{pad_left - 4}" y="{y + 4}" class="axis" text-anchor="end">'
            f"{html.escape(human(top * frac, unit))}</text>"
        )
    for frac in (0, 0.5, 1):
        x = pad_left + pw * frac
        stamp = dt.datetime.fromtimestamp(start + (end - start) * frac).strftime("%H:%M:%S")
        parts.append(f'<text x="{x}" y="{h - 3}" class="axis" text-anchor="middle">{stamp}</text>')
    for i, (_, data) in enumerate(series):
        coords = " ".join(
            f"{pad_left + pw * (t - start) / (end - start):.1f},{6 + ph * (1 - v / top):.1f}"
            for t, v in data
            if v == v
        )
        parts.append(
            f'<polyline points="{coords}" stroke="{COLORS[i % len(COLORS)]}" '
            'fill="none" stroke-width="1.6"/>'
        )
    parts.append("</svg>")
    return "".join(parts)


def panel_html(panel: dict[str, Any], server: promql.Prometheus, start: float, end: float) -> str:
    grid = panel["gridPos"]
    cell = WIDTH / 24
    style = (
        f"left:{grid['x'] * cell:.0f}px;top:{grid['y'] * ROW}px;"
        f"width:{grid['w'] * cell - 6:.0f}px;height:{grid['h'] * ROW - 6}px"
    )
    title = html.escape(panel["title"])
    if panel["type"] == "row":
        return f'<div class="row" style="{style}">{title}</div>'
    unit = panel["fieldConfig"]["defaults"].get("unit")
    body = ""
    if panel["type"] == "stat":
        (target,) = panel["targets"]
        result = server.query(target["expr"])
        value = float(result[0]["value"][1]) if result else float("nan")
        body = f'<div class="stat">{html.escape(human(value, unit))}</div>'
    elif panel["type"] == "table":
        rows: dict[str, dict[str, float]] = {}
        for target in panel["targets"]:
            for r in server.query(target["expr"]):
                rows.setdefault(r["metric"].get("batch", ""), {})[target["legendFormat"]] = float(
                    r["value"][1]
                )
        head = "".join(f"<th>{c}</th>" for c in ("batch", "done", "total", "ETA"))
        lines = "".join(
            f"<tr><td>{html.escape(b)}</td><td>{v.get('done', 0):.0f}</td>"
            f"<td>{v.get('total', 0):.0f}</td>"
            f"<td>{html.escape(human(v.get('eta', float('nan')), 's'))}</td></tr>"
            for b, v in sorted(rows.items())
        )
        body = f"<table><tr>{head}</tr>{lines}</table>"
    else:
        series = []
        for target in panel["targets"]:
            step = max((end - start) / 300, 1.0)
            for r in server.query_range(target["expr"], start, end, step):
                data = [(float(t), float(v)) for t, v in r["values"]]
                series.append((legend(target["legendFormat"], r["metric"]), data))
        w, h = int(grid["w"] * cell - 6), grid["h"] * ROW - 6 - 44
        keys = "".join(
            f'<span><i style="background:{COLORS[i % len(COLORS)]}"></i>{html.escape(name)}</span>'
            for i, (name, _) in enumerate(series)
        )
        body = timeseries_svg(series, w, h, unit, start, end) + f'<div class="legend">{keys}</div>'
    return f'<div class="panel" style="{style}"><div class="title">{title}</div>{body}</div>'


def page(server: promql.Prometheus, start: float, end: float) -> str:
    board = promql.dashboard()
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in board["panels"])
    panels = "".join(panel_html(p, server, start, end) for p in board["panels"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><style>
body {{ background:#111217; color:#ccccdc; font:12px sans-serif; margin:0; }}
header {{ padding:10px 14px; font-size:15px; color:#fff; }}
header small {{ color:#8e8e9e; font-size:11px; margin-left:10px; }}
.board {{ position:relative; margin:0 8px; width:{WIDTH}px; height:{bottom * ROW}px; }}
.panel {{ position:absolute; background:#181b1f; border:1px solid #2c3235; border-radius:3px;
          overflow:hidden; }}
.title {{ padding:6px 8px; font-weight:600; color:#d8d9da; }}
.row {{ position:absolute; font-size:13px; font-weight:600; color:#fff; padding-top:6px; }}
.stat {{ font-size:34px; color:#73bf69; text-align:center; padding-top:10px; }}
.grid {{ stroke:#2c3235; }} .axis {{ fill:#8e8e9e; font-size:10px; }}
.legend span {{ margin:0 8px; white-space:nowrap; font-size:11px; }}
.legend i {{ display:inline-block; width:10px; height:3px; margin-right:4px;
             vertical-align:middle; }}
table {{ margin:4px 8px; border-collapse:collapse; width:95%; }}
th, td {{ text-align:left; padding:3px 8px; border-bottom:1px solid #2c3235; }}
</style></head><body><header>{html.escape(board["title"])}
<small>each panel's queries evaluated by Prometheus over a real run; drawn without Grafana
(not installable here) by tests/support/dashboard_screenshot.py</small></header>
<div class="board">{panels}</div></body></html>"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "docs" / "dashboard.png")
    parser.add_argument(
        "--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    parser.add_argument("--redis", default=redis_url_on_db("redis://127.0.0.1:6379/0", 12))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="dashboard-shot-") as tmp,
        scratch_database(args.postgres) as database_url,
    ):
        work = pathlib.Path(tmp)
        cluster = Cluster(
            tmp_path=work, database_url=database_url, broker_url=args.redis, lease=3.0
        )
        cluster.reset_tables()
        port = free_port()
        _, stop = metrics.serve(cluster.store, port=port, addr="127.0.0.1", interval=1.0)
        server = promql.Prometheus(work, f"127.0.0.1:{port}", free_port())
        try:
            server.wait_scraped()
            start = time.time()
            with app_on(args.redis, cluster.queue):
                run(cluster)
            end = time.time()
            (work / "dashboard.html").write_text(page(server, start - 20, end))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            chromium(
                args.chromium,
                f"file://{work / 'dashboard.html'}",
                work / "profile",
                "--window-size=1520,1760",
                f"--screenshot={args.out.resolve()}",
            )
        finally:
            server.close()
            stop.set()
            cluster.close()
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
