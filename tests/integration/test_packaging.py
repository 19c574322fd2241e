"""The wheel carries its SQL and works from any folder, installed in a fresh environment."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
import uuid
import zipfile
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from pipeline.store import postgres
from tests.support.processes import REPO


def _run(*args: str | pathlib.Path, cwd: pathlib.Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=100
    )
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The project built as a wheel (with the build backend already installed here)."""
    out = tmp_path_factory.mktemp("dist")
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        out,
        REPO,
        cwd=out,
    )
    # The distribution's name (`pipeline` on PyPI is another project), as a wheel spells it.
    (built,) = out.glob("pipeline_exactly_once-*.whl")
    return built


@pytest.fixture
def empty_database_url(database_url: str) -> Iterator[str]:
    """A database with nothing in it, dropped afterwards."""
    name = f"pipeline_wheel_{uuid.uuid4().hex[:10]}"
    admin = (
        sa.make_url(database_url)
        .set(database="postgres", drivername="postgresql")
        .render_as_string(hide_password=False)
    )
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield sa.make_url(database_url).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.slow
def test_wheel__contains_the_sql(wheel: pathlib.Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "pipeline/store/sql/queries.sql" in names
    for _, name, _ in postgres.migrations():
        assert f"pipeline/store/sql/migrations/{name}.sql" in names
    assert "pipeline/__init__.py" in names
    assert not any(n.startswith(("tests/", "sql/")) for n in names)


@pytest.mark.slow
def test_wheel__installed_alone_upgrades_a_database_from_another_folder(
    wheel: pathlib.Path, empty_database_url: str, tmp_path: pathlib.Path
) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    pip = (sys.executable, "-m", "pip", "--python", python)
    _run(*pip, "install", "-q", "--no-deps", wheel, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The dependencies come from this environment's site-packages; the project must not
    # (that folder only holds an editable install's path hook, which PYTHONPATH ignores).
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": sysconfig.get_paths()["purelib"],
        "HOME": str(tmp_path),
    }
    where = _run(
        python,
        "-c",
        "import pipeline, pipeline.store.postgres as s;"
        " print(pipeline.__file__); print(s.sql_dir())",
        cwd=elsewhere,
        env=env,
    ).split()
    site = str(venv.resolve())
    assert where[0].startswith(site), f"pipeline imported from {where[0]}, not the wheel"
    assert where[1].startswith(site), f"SQL read from {where[1]}, not the wheel"
    # `pipeline --version` finds the installed distribution under its own name.
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    shown = _run(python, "-m", "pipeline.cli", "--version", cwd=elsewhere, env=env)
    assert shown.split()[-1] == version, shown

    out = _run(
        python,
        "-m",
        "pipeline.cli",
        "db",
        "upgrade",
        "--database-url",
        empty_database_url,
        cwd=elsewhere,
        env=env,
    )
    latest = postgres.migrations()[-1][0]
    assert f"schema version {latest}" in out
    dsn = sa.make_url(empty_database_url).set(drivername="postgresql")
    with psycopg.connect(dsn.render_as_string(hide_password=False)) as conn:
        row = conn.execute(
            "SELECT to_regclass('file_checkpoints') IS NOT NULL,"
            " EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'pipeline_claim_v1'),"
            " (SELECT max(version) FROM pipeline_schema_version)"
        ).fetchone()
    assert row == (True, True, latest)


OFFLINE = REPO.parent / "shared" / "tools" / "offline"


def _offline_prefix() -> list[str]:
    """../shared/tools/offline when it can run here (a network namespace: nothing answers)."""
    if not OFFLINE.exists():
        return []
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False)
    return [str(OFFLINE)] if probe.returncode == 0 else []


def _unmet_requirements(wheel: pathlib.Path, extras: set[str]) -> list[str]:
    """The wheel's requirements (with `extras`) that the installed distributions do not meet."""
    from importlib import metadata

    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        meta = archive.read(name).decode()
    unmet = []
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not any(
            req.marker.evaluate({"extra": extra}) for extra in extras | {""}
        ):
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(version, prereleases=True):
            unmet.append(f"{req} (installed {version})")
    return unmet


@pytest.mark.slow
def test_wheel__installed_in_a_new_venv_runs_the_demo_offline(
    wheel: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """`pip install '<wheel>[local]'` then `pipeline demo`, away from the checkout.

    What this proves: the wheel alone (package, SQL, console script) runs the demo on its
    private servers, from a folder that is not the checkout, with no service running (inside
    ../shared/tools/offline where it can). What it does not: fetching the dependencies from
    an index (nothing to fetch from offline). They come from this environment, on PYTHONPATH,
    after checking that they meet every requirement the wheel declares with the `local` extra,
    i.e. that pip would install it beside them without downloading anything.
    """
    assert _unmet_requirements(wheel, {"local"}) == []
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    pip = (sys.executable, "-m", "pip", "--python", venv / "bin" / "python")
    _run(*pip, "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    script = venv / "bin" / "pipeline"
    assert script.exists(), "the wheel installs no `pipeline` command"
    # Outside pytest's tree: the embedded Postgres's system user must reach the data folder
    # (another pytest session resets /tmp/pytest-of-<user> to 0700).
    home = pathlib.Path(tempfile.mkdtemp(prefix="pipeline-wheel-"))
    try:
        home.chmod(0o755)
        env = {
            "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
            "PYTHONPATH": sysconfig.get_paths()["purelib"],
            "HOME": str(home),
            "PIPELINE_STATE_DIR": str(home / "state"),
            "COLUMNS": "200",
        }
        done = subprocess.run(
            [*_offline_prefix(), str(script), "demo", "--files", "12"],
            cwd=home,
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
            check=False,
        )
        report = f"{done.returncode}\n{done.stdout}\n{done.stderr}"
        assert done.returncode == 0, report
        cells = r"\s*│\s*".join(["0", "0", "11", "0", "1"])
        assert re.search(rf"demo\s*│\s*{cells}\s*│", done.stdout), report
        # The workers ran the wheel's code, not the checkout's.
        logs = "".join(p.read_text() for p in (home / "state" / "logs").glob("worker*.log"))
        assert "pipeline.ingest" in logs, logs[-2000:]
        where = _run(
            venv / "bin" / "python", "-c", "import pipeline; print(pipeline.__file__)",
            cwd=home, env=env,
        )  # fmt: skip
        assert where.startswith(str(venv.resolve())), where
    finally:
        shutil.rmtree(home, ignore_errors=True)
