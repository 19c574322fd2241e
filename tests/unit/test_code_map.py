"""The README's code map names every module of the package, and nothing that is gone (the
docs build fails on a path that does not exist); each module states its one job first and
stays small enough to read in one sitting."""

from __future__ import annotations

import ast
import pathlib
import re

from tests.support.processes import REPO

# "About 400 lines" (issue 19): past this a module holds more than one job; split it by job.
MAX_MODULE_LINES = 420


def test_code_map__names_every_module() -> None:
    readme = (REPO / "README.md").read_text()
    start = readme.index("[start:codemap]")
    end = readme.index("[end:codemap]")
    named = set(re.findall(r"`(pipeline/[\w/]+\.py)`", readme[start:end]))
    modules = {
        str(path.relative_to(REPO))
        for path in (REPO / "pipeline").rglob("*.py")
        # a package's __init__ that only states its role (a docstring) is not a module to map
        if not (path.name == "__init__.py" and _docstring_only(path)) and path.name != "__main__.py"
    }
    assert modules - named == set(), "modules missing from the README's code map"
    assert named - modules == set(), "the code map names modules that do not exist"


def _docstring_only(path: pathlib.Path) -> bool:
    text = path.read_text().strip()
    return text.startswith('"""') and text.endswith('"""') and text.count('"""') == 2


def test_modules__each_states_its_job_in_a_docstring_and_stays_under_about_400_lines() -> None:
    unstated, long = [], []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        text = path.read_text()
        name = str(path.relative_to(REPO))
        if not (ast.get_docstring(ast.parse(text)) or "").strip():
            unstated.append(name)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long.append(f"{name}: {len(text.splitlines())} lines")
    assert unstated == [], "modules without a docstring stating their job"
    assert long == [], f"modules over {MAX_MODULE_LINES} lines"
