"""SQL kept in .sql files as named blocks: `-- name --`, a line or two of comment, the SQL."""

from __future__ import annotations

import pathlib
import re

_HEADER = re.compile(r"^-- ([a-z_]+) --\s*$", re.MULTILINE)


def named_blocks(path: pathlib.Path) -> dict[str, str]:
    """Each block's SQL by its name, without the comment lines."""
    blocks = _HEADER.split(path.read_text())
    return {
        name: "\n".join(ln for ln in body.strip().splitlines() if not ln.startswith("--"))
        for name, body in zip(blocks[1::2], blocks[2::2], strict=True)
    }
