"""The real `pipeline` command line in a subprocess, and the processes a run leaves behind."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence

import psutil

from tests.support.processes import REPO

_SCRIPT = pathlib.Path(sys.executable).parent / "pipeline"
# The installed console script when there is one, else the same entry point through -m.
PIPELINE: list[str] = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "pipeline.cli"]


@dataclasses.dataclass(frozen=True)
class Result:
    """What one CLI run printed and returned."""

    args: Sequence[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def flat_stderr(self) -> str:
        """stderr with runs of whitespace folded to one space (rich wraps long lines)."""
        return re.sub(r"\s+", " ", self.stderr)

    def describe(self) -> str:
        return (
            f"pipeline {' '.join(self.args)} -> {self.returncode}\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )


def cli_env(base: Mapping[str, str] | None = None, **overrides: str | None) -> dict[str, str]:
    """An environment for the CLI: `base` (default os.environ) without any PIPELINE_ variable
    it does not name, then `overrides` (None removes a variable).

    COLUMNS is wide so that rich does not wrap messages the tests look for.
    """
    source = dict(os.environ if base is None else base)
    if base is None:
        source = {k: v for k, v in source.items() if not k.startswith("PIPELINE_")}
    source.update(COLUMNS="400", PYTHONUNBUFFERED="1")
    for key, value in overrides.items():
        if value is None:
            source.pop(key, None)
        else:
            source[key] = value
    return source


def run_cli(
    *args: str,
    env: Mapping[str, str],
    cwd: pathlib.Path | str | None = None,
    stdin: str | None = None,
    timeout: float = 90,
) -> Result:
    """Run `pipeline ARGS...` to the end; its exit status and output."""
    proc = subprocess.run(
        [*PIPELINE, *args],
        env=dict(env),
        cwd=cwd or REPO,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Result(args, proc.returncode, proc.stdout, proc.stderr)


def assert_no_traceback(result: Result) -> None:
    assert "Traceback" not in result.output, result.describe()


def processes_of(state_dir: pathlib.Path | str, *also: str) -> list[str]:
    """Live processes tied to `state_dir`: in their command line or environment, or naming
    one of `also` (e.g. a socket path) in their command line. Each as "pid cmdline"."""
    needles = [str(state_dir), *also]
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["pid"] == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(proc.info["cmdline"] or ())
        try:
            environ = proc.environ()
        except (psutil.Error, OSError):
            environ = {}
        in_env = any(str(state_dir) in value for value in environ.values())
        if in_env or any(needle in cmdline for needle in needles):
            found.append(f"{proc.info['pid']} {cmdline}")
    return found
