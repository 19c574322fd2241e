"""The `pipeline` command: the group and every command, registered by importing their modules."""

from __future__ import annotations

from pipeline.cli import batches, files, prune, serve
from pipeline.cli.group import main

__all__ = ["batches", "files", "main", "prune", "serve"]

if __name__ == "__main__":  # pragma: no cover
    main()
