"""The README's code map names every module of the package, and nothing that is gone (the
docs build fails on a path that does not exist)."""

from __future__ import annotations

import pathlib
import re

from tests.support.processes import REPO


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
