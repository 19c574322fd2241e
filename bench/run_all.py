"""Run every benchmark in turn (default sizes, or --quick for a small smoke run), then write
bench/RESULTS.md from the sections they saved in bench/results/.

Default sizes are the benchmark issue's; see each script's --help. `make bench` runs this.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common

BENCH_DIR = common.ROOT / "bench"
# (results name, script, arguments for --quick)
SCRIPTS: list[tuple[str, str, list[str]]] = [
    ("tasks", "bench_tasks.py", ["--tasks", "300", "--rounds", "1", "--race", "100:20,10000:2"]),
    ("store", "bench_store.py", ["--seconds", "1", "--rounds", "1"]),
    ("submit", "bench_submit.py", ["--urls", "1000", "--rounds", "1"]),
    ("scale", "bench_scale.py", ["--rows", "20000", "--rounds", "2"]),
    ("recovery", "bench_recovery.py", ["--rounds", "1"]),
    ("watch", "bench_watch.py", ["--objects", "5000", "--new", "500", "--rounds", "1"]),
    (
        "ingest",
        "bench_ingest.py",
        ["--records", "100000", "--files", "8", "--long-lines", "300000"],
    ),
    ("ingest_s3", "bench_ingest_s3.py", ["--records", "50000", "--rounds", "1"]),
    ("resume", "bench_resume.py", ["--lines", "300000", "--rounds", "1"]),
    (
        "batches",
        "bench_batches.py",
        ["--seconds", "2", "--rounds", "1", "--files", "100000", "--calls", "5"],
    ),
    ("fleet", "bench_fleet.py", ["--workers", "4", "--concurrency", "4", "--files", "400"]),
    (
        "fair",
        "bench_fair.py",
        ["--big", "500", "--small", "50", "--window", "5", "--settle", "20"],
    ),
]


KEPT_BEGIN = (
    "<!-- kept by hand: bench/run_all.py copies everything from here to the end marker as it is -->"
)
KEPT_END = (
    "<!-- end of the part kept by hand; below, the sections bench/run_all.py wrote in its last run"
    " -->"
)


def kept_by_hand(results: pathlib.Path) -> str | None:
    """The part of an existing RESULTS.md between the two markers, markers included: the
    summary and the before/after analyses, which no script writes (a run must not lose them)."""
    if not results.exists():
        return None
    text = results.read_text()
    begin, end = text.find(KEPT_BEGIN), text.find(KEPT_END)
    if begin < 0 or end < begin:
        return None
    return text[begin : end + len(KEPT_END)] + "\n"


def write_results(outcomes: dict[str, tuple[int, float]], quick: bool, total: float) -> None:
    results = BENCH_DIR / "RESULTS.md"
    kept = kept_by_hand(results)
    parts = [
        "# Benchmark results\n",
        "Regenerate with `make bench` (that is, `.venv/bin/python bench/run_all.py`; "
        "`--quick` for a small smoke run). The part between the two markers is kept by hand "
        "(summary, before/after analyses, each with its commands) and copied over by every run; "
        "each section after it is bench/results/<name>.md, written by bench/bench_<name>.py, "
        "which can also be run alone (see its --help). Every ratio was measured side by side "
        "in the same run.\n",
    ]
    if quick:
        parts.append(
            "**These figures come from `run_all.py --quick`: small sizes and single rounds, a "
            "smoke run proving the scripts work, not a measurement.**\n"
        )
    timing = ", ".join(f"{name} {took:,.0f} s" for name, (_, took) in outcomes.items())
    parts.append(f"Run time: {total:,.0f} s in all ({timing}).\n")
    if kept is not None:
        parts.append(kept)
    for name, _script, _quick in SCRIPTS:
        if name not in outcomes:
            continue
        code, _ = outcomes[name]
        section = common.RESULTS_DIR / f"{name}.md"
        if code != 0:
            parts.append(f"## {name}\n\nFAILED in this run (exit status {code}); see its output.\n")
        elif section.exists():
            parts.append(section.read_text().rstrip() + "\n")
    results.write_text("\n".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--only", help="comma-separated subset, e.g. store,scale (RESULTS.md gets those only)"
    )
    args = parser.parse_args()
    chosen = set(args.only.split(",")) if args.only else None
    outcomes: dict[str, tuple[int, float]] = {}
    started = time.monotonic()
    for name, script, quick_args in SCRIPTS:
        if chosen is not None and name not in chosen:
            continue
        cmd = [sys.executable, str(BENCH_DIR / script), *(quick_args if args.quick else [])]
        print(f"=== {script} {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        code = subprocess.call(cmd, cwd=common.ROOT)
        outcomes[name] = (code, time.monotonic() - t0)
        print(
            f"=== {script}: exit {code} in {outcomes[name][1]:,.0f} s", file=sys.stderr, flush=True
        )
    total = time.monotonic() - started
    write_results(outcomes, args.quick, total)
    print(f"wrote {BENCH_DIR / 'RESULTS.md'} ({total:,.0f} s in all)", file=sys.stderr)
    failed = [name for name, (code, _) in outcomes.items() if code != 0]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
