"""`make bench` rewrites bench/RESULTS.md: the part kept by hand must come through a run."""

from __future__ import annotations

import pathlib

from bench import run_all


def test_kept_by_hand__the_marked_part_comes_back_markers_included(tmp_path: pathlib.Path) -> None:
    results = tmp_path / "RESULTS.md"
    kept = f"{run_all.KEPT_BEGIN}\n\n## Summary\n\n| a | b |\n\n{run_all.KEPT_END}"
    results.write_text(f"# old header\n\n{kept}\n\n## Task overhead: an old run\n")
    assert run_all.kept_by_hand(results) == kept + "\n"


def test_kept_by_hand__nothing_without_both_markers(tmp_path: pathlib.Path) -> None:
    results = tmp_path / "RESULTS.md"
    assert run_all.kept_by_hand(results) is None  # no file yet
    results.write_text(f"# header\n{run_all.KEPT_BEGIN}\n## Summary\n")
    assert run_all.kept_by_hand(results) is None
    results.write_text(f"{run_all.KEPT_END}\n## Summary\n{run_all.KEPT_BEGIN}\n")
    assert run_all.kept_by_hand(results) is None


def test_kept_by_hand__the_committed_results_have_their_part() -> None:
    kept = run_all.kept_by_hand(run_all.BENCH_DIR / "RESULTS.md")
    assert kept is not None
    assert "## Summary" in kept
