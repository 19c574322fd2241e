"""mkdocs hook: every test, file and page that the docs and the README cite must exist.

The guarantees cite the tests that prove them, and the pages cite files of the repository
(`pipeline/masking.py`, `bench/RESULTS.md`); mkdocs checks links between pages, not these. A
citation left behind by a rename is logged as a warning here, so `mkdocs build --strict`
(`make docs`) fails on it. The README is read too: its guarantees table is included in a
page, and its links into docs/ must name files that exist.
"""

from __future__ import annotations

import functools
import logging
import pathlib
import re
from typing import Any

log = logging.getLogger("mkdocs.hooks.references")
ROOT = pathlib.Path(__file__).resolve().parents[2]

# `tests/unit/test_x.py`, `test_x.py::test_case`, or `::test_case` (in the file cited last);
# a parametrised id (`[redis]`) belongs to the citation, not to the function's name.
TEST_REF = re.compile(
    r"`(?=[\w./-]*test_\w+\.py|::test_)"
    r"((?:[\w.-]+/)*test_\w+\.py)?(?:::(test_\w+)(?:\[[^\]`]*\])?)?`"
)
# A path inside the repository: one of its top-level folders, then plain name characters.
PATH_REF = re.compile(r"`((?:pipeline|tests|bench|sql|docs|\.ci)/[\w./-]*)`")
DOCS_LINK = re.compile(r"\]\((docs/[^)\s#]+)")


@functools.cache
def _test_files(name: str) -> list[pathlib.Path]:
    return sorted((ROOT / "tests").rglob(name))


def _test_file(cited: str) -> pathlib.Path | str:
    """The file a citation names, or why it names none."""
    if "/" in cited:
        path = ROOT / cited
        return path if path.is_file() else f"no file {cited}"
    found = _test_files(cited)
    if len(found) != 1:
        return f"{len(found)} files named {cited} under tests/"
    return found[0]


def _defines(path: pathlib.Path, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def {name}\(", path.read_text(), re.M) is not None


def problems(markdown: str) -> list[str]:
    """What `markdown` cites that does not exist."""
    found: list[str] = []
    current: pathlib.Path | None = None  # the test file a bare `::test_case` belongs to
    for match in TEST_REF.finditer(markdown):
        cited_file, case = match.groups()
        if cited_file:
            resolved = _test_file(cited_file)
            if isinstance(resolved, str):
                found.append(f"{match[0]}: {resolved}")
                current = None
                continue
            current = resolved
        if case:
            if current is None:
                found.append(f"{match[0]}: no test file cited before it")
            elif not _defines(current, case):
                found.append(f"{match[0]}: no {case} in {current.relative_to(ROOT)}")
    for match in PATH_REF.finditer(markdown):
        if not (ROOT / match[1]).exists():
            found.append(f"{match[0]}: no such file or folder in the repository")
    return found


def on_pre_build(config: Any) -> None:
    readme = (ROOT / "README.md").read_text()
    for problem in problems(readme):
        log.warning("README.md cites %s", problem)
    for target in DOCS_LINK.findall(readme):
        if not (ROOT / target).is_file():
            log.warning("README.md links to %s, which does not exist", target)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    for problem in problems(markdown):
        log.warning("%s cites %s", page.file.src_uri, problem)
    return markdown
