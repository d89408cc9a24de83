"""docker-compose.yml agrees with what the code accepts (Docker does not run here: parsing is
the check): commands parse with the CLI's own parser, ports and health checks match them,
every TRAINSERVE_* variable is a setting, is documented, and its value validates."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from tests.conftest import REPO
from tests.test_package import BUILD_INPUTS
from trainserve.cli import build_parser
from trainserve.config import Settings

COMPOSE = REPO / "docker-compose.yml"
_DEFAULTED = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolated(value: str) -> str:
    """What Compose puts in place of ``${VAR:-default}`` with VAR unset."""
    return _DEFAULTED.sub(lambda m: m.group(2) or "", value)


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert set(document["volumes"]) >= {"models", "postgres-data", "redis-data"}
    found: dict[str, Any] = document["services"]
    return found


def environment(service: dict[str, Any]) -> dict[str, str]:
    return {key: interpolated(str(value)) for key, value in service.get("environment", {}).items()}


def test_services_and_health_checks(services: dict[str, Any]) -> None:
    assert set(services) == {"api", "worker", "postgres", "redis"}
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD", name
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, name
            assert condition["condition"] == "service_healthy"
            assert "healthcheck" in services[dependency]


def test_api_command_port_and_health_check_agree(services: dict[str, Any]) -> None:
    api = services["api"]
    assert api["command"][0] == "trainserve"
    args = build_parser().parse_args(api["command"][1:])
    assert args.command == "serve"
    assert args.workers == 0  # training belongs to the worker service
    assert args.host == "0.0.0.0"  # reachable from outside its container
    published, container = api["ports"][0].split(":")
    assert int(container) == args.port
    assert int(published) > 0
    assert f"127.0.0.1:{args.port}/readyz" in " ".join(api["healthcheck"]["test"])


def test_worker_command_and_gpu_reservation(services: dict[str, Any]) -> None:
    worker = services["worker"]
    args = build_parser().parse_args(worker["command"][1:])
    assert args.command == "worker"
    health = build_parser().parse_args(worker["healthcheck"]["test"][2:])
    assert health.command == "check"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert worker["image"] == services["api"]["image"]


def test_variables_are_settings_documented_and_valid(services: dict[str, Any]) -> None:
    fields = {f"TRAINSERVE_{name.upper()}": name for name in Settings.model_fields}
    reference = (REPO / "docs" / "configuration.md").read_text()
    for name in ("api", "worker"):
        env = environment(services[name])
        unknown = {key for key in env if key.startswith("TRAINSERVE_")} - set(fields)
        assert not unknown, f"{name}: not settings: {unknown}"
        undocumented = {key for key in env if f"`{key}`" not in reference}
        assert not undocumented, f"{name}: not in docs/configuration.md: {undocumented}"
        settings = Settings(**{fields[key]: value or None for key, value in env.items()})  # validates every value
        # The shared services are reached by their service names, with the right schemes.
        database, queue = urlparse(settings.resolved_database_url), urlparse(settings.resolved_queue_url)
        assert (database.scheme, database.hostname) == ("postgresql+psycopg", "postgres")
        assert (queue.scheme, queue.hostname) == ("redis", "redis")
        assert database.path.lstrip("/") == services["postgres"]["environment"]["POSTGRES_DB"]
        # Every node sees the same model store: the shared volume, mounted where the setting points.
        mounts = dict(volume.split(":", 1) for volume in services[name]["volumes"])
        assert mounts["models"] == str(settings.store_dir)
    assert (
        environment(services["api"])["TRAINSERVE_DATABASE_URL"]
        == environment(services["worker"])["TRAINSERVE_DATABASE_URL"]
    )


@dataclass
class Stage:
    """One ``FROM`` of the Dockerfile: its name and its instructions, continuation lines joined."""

    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for word, rest in self.instructions if word == keyword]


def dockerfile_stages() -> list[Stage]:
    stages: list[Stage] = []
    for line in (REPO / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            _image, _, name = rest.partition(" AS ")
            stages.append(Stage(name.strip() or None))
        else:
            stages[-1].instructions.append((keyword.upper(), " ".join(rest.split())))
    return stages


def copied_from_context(stage: Stage) -> list[str]:
    """The paths a stage's ``COPY`` instructions take from the build context (not from a stage)."""
    sources: list[str] = []
    for rest in stage.all("COPY"):
        words = rest.split()
        if not any(word.startswith("--from") for word in words):
            sources += [word for word in words[:-1] if not word.startswith("--")]
    return sources


def _dockerignore_pattern(pattern: str) -> re.Pattern[str]:
    # As Docker matches: `*` and `?` stay within one folder, `**` spans any number of them,
    # and a matched folder takes everything under it.
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        else:
            regex += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(regex + "(?:/.*)?")


def dockerignored(path: str) -> bool:
    ignored = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        if _dockerignore_pattern(pattern.removeprefix("!").strip("/")).fullmatch(path):
            ignored = not pattern.startswith("!")  # the last pattern that matches decides
    return ignored


def test_image_installs_the_extras_the_services_use() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "-c constraints.txt" in dockerfile
    assert re.search(r"\.whl\)?\[(?=[^\]]*redis)(?=[^\]]*postgres)[^\]]*\]", dockerfile)
    for path in ("service", "migrations"):
        assert f"COPY {path} ./{path}" in dockerfile
        assert Path(REPO / path).is_dir()
    # The generated training loop and row-wise forward pass need a C compiler in the image.
    assert re.search(r"apt-get install [^\n]*\bgcc\b", dockerfile)


def test_image_runs_the_built_wheel_not_the_source() -> None:
    *builders, final = dockerfile_stages()
    (build,) = builders
    # The build stage gets what building the wheel needs (tests/test_package.py builds it
    # from these alone), and makes the wheel.
    assert sorted(copied_from_context(build)) == sorted(BUILD_INPUTS)
    assert any(re.match(r"pip wheel .*--no-deps .*-w /wheels \.$", run) for run in build.all("RUN"))
    # The final stage installs that wheel, with the extras and the pins, never the source.
    assert f"--from={build.name} /wheels /wheels" in final.all("COPY")
    assert copied_from_context(final) == ["constraints.txt"]
    (install,) = (run for run in final.all("RUN") if "pip install" in run)
    assert "-c constraints.txt" in install
    extras = re.search(r'"\$\(echo /wheels/trainserve-\*\.whl\)\[([a-z0-9,]+)\]"', install)
    assert extras is not None, install
    assert {"redis", "postgres"} <= set(extras.group(1).split(","))
    assert not re.search(r"(^|\s)(-e|--editable)(\s|$)", " ".join(run for s in (build, final) for run in s.all("RUN")))
    # Workers compile generated C at run time: the compiler is in the image that runs.
    (apt,) = (run for run in final.all("RUN") if "apt-get install" in run)
    assert {"gcc", "libc6-dev"} <= set(apt.split())
    assert "TRAINSERVE_DATA_DIR=/var/lib/trainserve" in final.all("ENV")
    (cmd,) = final.all("CMD")
    args = build_parser().parse_args(json.loads(cmd)[1:])
    assert (args.command, args.host) == ("serve", "0.0.0.0")
    assert final.all("EXPOSE") == [str(args.port)]


def test_every_path_the_image_copies_is_in_the_build_context() -> None:
    for stage in dockerfile_stages():
        for source in copied_from_context(stage):
            path = REPO / source
            assert path.exists(), source
            assert not dockerignored(source), f".dockerignore leaves out {source}"
            files = [path] if path.is_file() else path.rglob("*")
            for file in files:
                name = file.relative_to(REPO).as_posix()
                if file.is_file() and "__pycache__" not in file.parts and ".egg-info" not in name:
                    assert not dockerignored(name), f".dockerignore leaves out {name}"
    # What a local install or test run leaves among the sources stays out: the image's wheel
    # is built from the sources alone, as tests/test_package.py builds it.
    for leftover in ("service/trainserve.egg-info", "service/trainserve/api/__pycache__", ".venv", "build"):
        assert dockerignored(leftover), leftover
    assert not dockerignored("service/trainserve/static/ui/index.html")


def test_every_variable_the_docs_name_is_read_by_the_code() -> None:
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    named = set(re.findall(r"TRAINSERVE_[A-Z0-9_]*[A-Z0-9]", "".join(path.read_text() for path in docs)))
    fields = {f"TRAINSERVE_{name.upper()}" for name in Settings.model_fields}
    # Besides the service's settings, the command-line client reads a few variables of its own.
    # The tests' own variables (docs/development.md: their servers, the fuzz run's seed) are
    # read in the tests.
    sources = [*(REPO / "service").rglob("*.py"), *(REPO / "tests").rglob("*.py")]
    code = "".join(path.read_text() for path in sources)
    read_directly = {name for name in named if f'"{name}"' in code}
    assert named - fields - read_directly == set()
