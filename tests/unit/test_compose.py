"""docker-compose.yml, the Dockerfile and the Makefile's stack targets, checked without Docker.

No Docker engine is needed: the compose file is read with PyYAML, each service's command is
run with `--help` against the installed package (so a renamed subcommand or option fails
here), and `docker compose config` validates the file when a compose CLI is installed.
"""

from __future__ import annotations

import functools
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.support.processes import REPO

COMPOSE = REPO / "docker-compose.yml"
LOCAL_DEFAULT = "local-only-password"
SERVICES = (
    "postgres",
    "redis",
    "migrate",
    "worker",
    "beat",
    "flower",
    "metrics",
    "watch",
    "prometheus",
    "grafana",
)
PIPELINE_SERVICES = ("migrate", "worker", "beat", "flower", "metrics", "watch")
# ${VAR}, ${VAR:-default}, ${VAR-default}
INTERPOLATION = re.compile(r"\$\{(?P<var>[A-Za-z_][A-Za-z0-9_]*)(?:(?::?-)(?P<default>[^}]*))?\}")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|BASIC_AUTH", re.IGNORECASE)


@functools.cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, Any]:
    result: dict[str, Any] = compose()["services"]
    return result


def with_defaults(text: str) -> str:
    """`text` as compose would interpolate it with no variables set."""
    return INTERPOLATION.sub(lambda m: m["default"] or "", text)


def command(service: str) -> list[str]:
    cmd = services()[service].get("command")
    assert isinstance(cmd, list), f"{service}: command should be a list (exec form), got {cmd!r}"
    return [with_defaults(str(part)) for part in cmd]


def strings(node: Any) -> Iterator[str]:
    """Every string in a parsed YAML tree, keys included."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, item in node.items():
            yield from strings(key)
            yield from strings(item)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def environment(service: str) -> dict[str, str]:
    env = services()[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def bin_dir() -> pathlib.Path:
    return pathlib.Path(sys.executable).parent


def run_help(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    return subprocess.run(
        [*argv, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def test_compose__has_every_service() -> None:
    assert set(SERVICES) <= set(services()), sorted(services())


def test_compose__postgres_has_a_healthcheck_and_a_volume() -> None:
    postgres = services()["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    volumes = [str(v) for v in postgres["volumes"]]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in volumes), volumes
    named = volumes[0].split(":", 1)[0]
    assert named in (compose().get("volumes") or {}), f"volume {named} is not declared"


def test_compose__redis_has_a_healthcheck() -> None:
    assert "ping" in " ".join(services()["redis"]["healthcheck"]["test"])


def test_compose__migrate_upgrades_the_schema() -> None:
    assert command("migrate") == ["pipeline", "db", "upgrade"]
    assert services()["migrate"].get("restart") in ("no", None)


@pytest.mark.parametrize("service", SERVICES)
def test_compose__depends_on_waits_for_a_condition(service: str) -> None:
    depends = services()[service].get("depends_on") or {}
    assert isinstance(depends, dict), f"{service}: depends_on without conditions: {depends}"
    for target, spec in depends.items():
        assert spec.get("condition") in ("service_healthy", "service_completed_successfully"), (
            service,
            target,
            spec,
        )
        if spec["condition"] == "service_healthy":
            assert "healthcheck" in services()[target], f"{target} has no healthcheck"


@pytest.mark.parametrize("service", ["worker", "beat", "flower", "metrics", "watch"])
def test_compose__pipeline_services_start_after_the_migration(service: str) -> None:
    depends = services()[service]["depends_on"]
    assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert services()["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose__no_sleep_anywhere() -> None:
    for name, service in services().items():
        for part in strings([service.get("command"), service.get("entrypoint")]):
            assert not re.search(r"\bsleep\b", part), f"{name}: {part!r}"
        for part in strings((service.get("healthcheck") or {}).get("test")):
            assert not re.search(r"\bsleep\b", part), f"{name} healthcheck: {part!r}"


@pytest.mark.parametrize("service", PIPELINE_SERVICES)
def test_compose__command_is_one_the_project_provides(service: str) -> None:
    """`<command> --help` exits 0: the subcommand and every option given to it exist."""
    argv = command(service)
    if argv[0] == "pipeline":
        result = run_help([str(bin_dir() / "pipeline"), *argv[1:]])
    else:
        assert argv[:3] == ["celery", "-A", "pipeline"], argv
        assert argv[3] in ("worker", "beat"), argv
        result = run_help([sys.executable, "-m", "celery", *argv[1:]])
    assert result.returncode == 0, (argv, result.stdout[-2000:], result.stderr[-2000:])
    assert "Usage:" in result.stdout


def test_compose__watch_scans_the_pattern_workers_can_read(tmp_path: pathlib.Path) -> None:
    """The pattern and interval come from the environment with working defaults, and the
    folder the watch lists is mounted, at the same path, in the workers that read it."""
    argv = command("watch")
    assert argv[:2] == ["pipeline", "watch"], argv
    raw = [str(part) for part in services()["watch"]["command"]]
    assert INTERPOLATION.fullmatch(raw[2])["var"] == "PIPELINE_WATCH_PATTERN"  # type: ignore[index]
    assert INTERPOLATION.fullmatch(raw[raw.index("--every") + 1])["var"] == "PIPELINE_WATCH_EVERY"  # type: ignore[index]
    from pipeline.sources import watchspec

    assert watchspec.parse_interval(argv[argv.index("--every") + 1]) == 30.0
    pattern = argv[2]
    mounts = {with_defaults(str(v)).split(":")[1] for v in services()["watch"]["volumes"]}
    assert any(pattern.startswith(m + "/") for m in mounts), (pattern, mounts)
    worker_mounts = {with_defaults(str(v)) for v in services()["worker"].get("volumes", [])}
    assert {with_defaults(str(v)) for v in services()["watch"]["volumes"]} <= worker_mounts
    # Its default pattern, run for real on a copy of the layout: the image's command works.
    (tmp_path / "data" / "incoming" / "day1").mkdir(parents=True)
    (tmp_path / "data" / "incoming" / "day1" / "a.jsonl").write_text("{}\n")
    local_pattern = str(tmp_path) + pattern
    from pipeline.sources import producer

    found = [url for _, _, url, _, _ in producer.from_glob(local_pattern)]
    assert [u.rsplit("/", 2)[-2:] for u in found] == [["day1", "a.jsonl"]]


def test_compose__flower_has_basic_auth() -> None:
    auth = environment("flower").get("FLOWER_BASIC_AUTH")
    assert auth, "FLOWER_BASIC_AUTH is not set for flower"
    match = INTERPOLATION.fullmatch(auth)
    assert match, f"FLOWER_BASIC_AUTH must come from the environment: {auth!r}"
    user, _, password = (match["default"] or "").partition(":")
    assert user
    assert password == LOCAL_DEFAULT
    assert "--no-auth" not in command("flower")


def test_compose__every_password_is_a_marked_default_overridable_by_env() -> None:
    text = COMPOSE.read_text()
    # Every occurrence of the local default sits inside ${VAR:-...}.
    in_defaults = sum(
        (m["default"] or "").count(LOCAL_DEFAULT) for m in INTERPOLATION.finditer(text)
    )
    assert text.count(LOCAL_DEFAULT) == in_defaults > 0
    checked = 0
    for name in services():
        for key, val in environment(name).items():
            if SECRET_KEY.search(key):
                match = INTERPOLATION.fullmatch(val)
                assert match, f"{name}.{key} is a literal, not ${{VAR:-...}}: {val!r}"
                assert LOCAL_DEFAULT in (match["default"] or LOCAL_DEFAULT), (name, key, val)
                checked += 1
            # A password inside a URL (scheme://user:password@host) is interpolated as well.
            for url_password in re.findall(r"://[^:/@\s]+:(.+)@", val):
                assert INTERPOLATION.fullmatch(url_password), (name, key, val)
                assert with_defaults(url_password) == LOCAL_DEFAULT, (name, key, val)
                checked += 1
    assert checked >= 4  # POSTGRES_PASSWORD, FLOWER_BASIC_AUTH, Grafana's, the database URLs
    # Nothing secret-looking is left once the ${...} expressions are taken out.
    bare = INTERPOLATION.sub("", text)
    assert not re.search(r"://[^:/@\s]+:[^@\s]+@", bare), "a literal password in a URL"
    literal = re.search(r"(?i)(password|basic_auth)[ \t]*[:=][ \t]*[^\s#]", bare)
    assert not literal, f"a literal secret: {literal and literal.group(0)!r}"


def test_env_example__overrides_every_secret_the_compose_file_reads() -> None:
    example = (REPO / ".env.example").read_text()
    names = {m["var"] for m in INTERPOLATION.finditer(COMPOSE.read_text())}
    secrets = {n for n in names if SECRET_KEY.search(n)}
    assert secrets == {"POSTGRES_PASSWORD", "FLOWER_BASIC_AUTH", "GRAFANA_ADMIN_PASSWORD"}
    for name in secrets:
        assert re.search(rf"^{name}=\S", example, re.MULTILINE), f"{name} not in .env.example"
    assert LOCAL_DEFAULT not in example


def test_dockerfile__copies_what_the_package_build_needs() -> None:
    """The image runs `pip install .` on what COPY brought in: all of it must be there."""
    dockerfile = (REPO / "Dockerfile").read_text()
    copied: set[str] = set()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            copied.update(s.rstrip("/") for s in sources if not s.startswith("--"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {"pyproject.toml", project["project"]["readme"], *wheel["packages"]}
    needed |= set(wheel.get("force-include", {}))
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"
    ignored = (
        (REPO / ".dockerignore").read_text().split() if (REPO / ".dockerignore").exists() else []
    )
    assert not needed & set(ignored), ignored
    assert re.search(r"^USER (?!root)\S+", dockerfile, re.MULTILINE), "the image runs as root"


def compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose` (v1), whichever works here."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose__config_is_valid_for_the_compose_cli() -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env = {
        k: v for k, v in os.environ.items() if k not in ("POSTGRES_PASSWORD", "FLOWER_BASIC_AUTH")
    }
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE), "config", "-q"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_makefile__stack_targets_run_docker_compose() -> None:
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", "up", "down", "logs"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3, lines
    for line, verb in zip(lines, ("up", "down", "logs"), strict=True):
        assert line.split()[:3] == ["docker", "compose", verb], line


def mounts(service: str) -> dict[str, pathlib.Path]:
    """A service's bind mounts of repository folders: {container path: repository path}."""
    found = {}
    for volume in services()[service].get("volumes", []):
        source, target = with_defaults(str(volume)).split(":")[:2]
        if source.startswith("./"):
            found[target] = REPO / source[2:]
    return found


def in_container(service: str, path: str) -> pathlib.Path:
    """The repository file a container path of `service` reads through its bind mounts."""
    for target, source in mounts(service).items():
        if path == target or path.startswith(target + "/"):
            return source / path[len(target) :].lstrip("/")
    raise AssertionError(f"{service}: {path} is not in a bind mount of the repository")


def test_compose__prometheus_loads_the_rules_and_scrapes_the_exporter() -> None:
    argv = command("prometheus")
    config_path = next(a.split("=", 1)[1] for a in argv if a.startswith("--config.file="))
    config = yaml.safe_load(in_container("prometheus", config_path).read_text())
    base = in_container("prometheus", config_path).parent
    for rule_file in config["rule_files"]:
        assert (base / rule_file).is_file(), rule_file  # alerts.yml, beside the config
    assert "alerts.yml" in config["rule_files"]
    targets = {
        t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    port = command("metrics")[command("metrics").index("--port") + 1]
    assert f"metrics:{port}" in targets
    watch_port = command("watch")[command("watch").index("--metrics-port") + 1]
    assert f"watch:{watch_port}" in targets


def test_compose__grafana_provisions_the_dashboard_on_the_prometheus_service() -> None:
    provisioning = in_container("grafana", "/etc/grafana/provisioning")
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    published = {with_defaults(str(p)).split(":")[-1] for p in services()["prometheus"]["ports"]}
    assert source["url"] == f"http://prometheus:{published.pop()}"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "pipeline.yml").read_text())[
        "providers"
    ]
    dashboards = in_container("grafana", provider["options"]["path"])
    assert (dashboards / "pipeline.json").is_file()
    home = environment("grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert in_container("grafana", home).is_file()
