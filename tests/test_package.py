"""The package as a user gets it: the built wheel, installed (not editable) into a fresh venv,
serves, trains and predicts from an empty folder; its modules import one way (no cycle);
every package folder ships in the wheel; nothing of the project is importable as ``service``."""

from __future__ import annotations

import ast
import csv
import graphlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, Server, free_port, moons_spec, wait_until_ready

SOURCE_ROOT = REPO / "service"  # the source root of the import package (the role src/ plays)
PACKAGE = SOURCE_ROOT / "trainserve"
MIGRATIONS = REPO / "migrations"  # shipped inside the wheel as trainserve.migrations
# What building the wheel reads, and no more: the Dockerfile's build stage copies these
# (tests/test_compose.py checks it does), and the wheel below is built from a copy of them.
BUILD_INPUTS = ("pyproject.toml", "README.md", "service", "migrations")


def run(command: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"{command} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@dataclass(frozen=True)
class Installed:
    """A fresh venv with the built wheel installed into it, as a user would."""

    wheel: Path
    venv: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def env(self) -> dict[str, str]:
        """A user's shell with the venv activated: nothing of this test run leaks in (no
        PYTHONPATH to the checkout, no TRAINSERVE_* settings). PIP_* stays: it names the
        package index on this machine."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TRAINSERVE_", "VIRTUAL_ENV"))}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.venv)
        return env

    def python(self, code: str, *args: str, cwd: Path) -> str:
        return run([self.bin / "python", "-c", code, *args], cwd=cwd, env=self.env()).stdout


def build_wheel(workdir: Path) -> Path:
    # From a copy: an in-tree build leaves build/ and *.egg-info in the checkout (shared by
    # two runs at once), and a copy of BUILD_INPUTS alone proves they are all it needs.
    source = workdir / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(REPO / name, source / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", workdir / "dist", source], cwd=workdir)
    (wheel,) = (workdir / "dist").glob("trainserve-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    workdir = tmp_path_factory.mktemp("package")
    wheel = build_wheel(workdir)
    venv = workdir / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=workdir)
    # Dependencies come from the package index pip is configured with (pip's cache helps);
    # never --system-site-packages: the venv must hold only what the wheel asks for.
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", "-c", REPO / "constraints.txt", wheel], cwd=workdir)
    yield Installed(wheel, venv)
    # Over a GB with torch (pytest keeps its last three temporary folders): removed by a
    # detached rm, because deleting it here took up to a minute of the run on a busy machine.
    subprocess.run(["sh", "-c", 'rm -rf "$1" &', "sh", str(workdir)], check=True, timeout=30)


def source_files() -> set[str]:
    """Every file the wheel must hold, by its path inside the wheel."""
    found: set[str] = set()
    for root, prefix in ((PACKAGE, "trainserve"), (MIGRATIONS, "trainserve/migrations")):
        for path in root.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                found.add(f"{prefix}/{path.relative_to(root).as_posix()}")
    return found


def test_the_wheel_holds_the_package_and_its_migrations_and_nothing_else(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        (top_level,) = (name for name in names if name.endswith(".dist-info/top_level.txt"))
        assert wheel.read(top_level).decode().split() == ["trainserve"]
    shipped = {name for name in names if ".dist-info/" not in name}
    assert sorted(source_files() - shipped) == [], "left out of the wheel"
    assert sorted(shipped - source_files()) == [], "in the wheel, not in the source"


def test_the_installed_package_is_trainserve_never_service(installed: Installed, tmp_path: Path) -> None:
    # Outside the checkout, with nothing on sys.path but the venv.
    missing = subprocess.run(
        [installed.bin / "python", "-c", "import service"],
        cwd=tmp_path,
        env=installed.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode != 0
    assert "No module named 'service'" in missing.stderr

    where = installed.python(
        "import sysconfig, trainserve\n"
        "from trainserve import TrainserveClient\n"
        "from trainserve.db import migrations_dir\n"
        "print(trainserve.__file__)\n"
        "print(sysconfig.get_path('purelib'))\n"
        "print(migrations_dir())\n",
        cwd=tmp_path,
    )
    module_file, site_packages, migrations = (Path(line) for line in where.splitlines())
    assert module_file == Path(site_packages) / "trainserve" / "__init__.py"
    assert module_file.is_relative_to(installed.venv)
    assert not module_file.resolve().is_relative_to(REPO.resolve())
    # Alembic's scripts, where the app looks for them (trainserve serve migrates from there).
    assert migrations == site_packages / "trainserve" / "migrations"
    assert {"env.py", "script.py.mako"} <= {path.name for path in migrations.iterdir()}
    versions = {path.name for path in (MIGRATIONS / "versions").glob("0*.py")}
    assert versions
    assert {path.name for path in (migrations / "versions").glob("0*.py")} == versions

    for command in (["python", "-m", "trainserve", "--help"], ["trainserve", "--help"]):
        answer = run([installed.bin / command[0], *command[1:]], cwd=tmp_path, env=installed.env())
        assert "serve" in answer.stdout
        assert "worker" in answer.stdout


@contextmanager
def killed_if_left_running(server: Server) -> Iterator[None]:
    """Kill the server's process group if the test left it running (a failure half way)."""
    try:
        yield
    finally:
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


@pytest.mark.timeout(600)
def test_the_installed_wheel_serves_trains_and_predicts_from_an_empty_folder(
    installed: Installed, tmp_path: Path
) -> None:
    # The guide's moons table, written by the installed package's own examples module.
    table = tmp_path / "moons.csv"
    installed.python(
        "import sys\n"
        "from trainserve.examples import make_moons, to_csv\n"
        "x, y = make_moons(200, noise=0.05, seed=0)\n"
        "open(sys.argv[1], 'w').write(to_csv(x, y))\n",
        str(table),
        cwd=tmp_path,
    )
    with table.open() as rows:
        header, *body = list(csv.reader(rows))
    assert header == ["x0", "x1", "label"]
    inputs = [[float(row[0]), float(row[1])] for row in body]
    labels = [int(row[2]) for row in body]

    folder = tmp_path / "empty"  # the defaults: database, queue and model store land here
    folder.mkdir()
    port = free_port()
    log_path = tmp_path / "server.log"  # beside the folder, so that it starts empty
    # Training threads: the one setting given, because CI machines are shared.
    env = {**installed.env(), "TRAINSERVE_TRAIN_THREADS": "1"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [installed.bin / "trainserve", "serve", "--port", str(port)],
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", folder, process, log_path)
    with killed_if_left_running(server):
        wait_until_ready(server)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.get("/healthz").json() == {"status": "ok"}
            uploaded = http.post("/datasets", files={"file": ("moons.csv", table.read_bytes())})
            assert uploaded.status_code == 201, uploaded.text
            dataset = uploaded.json()
            assert dataset["n_rows"] == len(labels)

            queued = http.post("/train", json=moons_spec(dataset["id"]))
            assert queued.status_code == 202, queued.text
            job = queued.json()
            deadline = time.monotonic() + 300
            while job["status"] in {"queued", "running"} and time.monotonic() < deadline:
                time.sleep(0.5)
                job = http.get(f"/jobs/{job['id']}").json()
            assert job["status"] == "succeeded", f"{job}\n{server.log()}"

            answer = http.post("/predict", json={"model_id": job["model_id"], "inputs": inputs})
            assert answer.status_code == 200, answer.text
            predictions = answer.json()["predictions"]
        assert set(predictions) <= {0, 1}
        correct = sum(int(p == t) for p, t in zip(predictions, labels, strict=True))
        assert correct / len(labels) >= 0.9

        # Everything the service keeps is in the folder it was started in.
        assert (folder / "trainserve.db").is_file()
        assert (folder / "trainserve-queue.db").is_file()
        assert (folder / "models_store" / "weights" / f"{job['model_id']}.safetensors").is_file()

        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, server.log()
        # Its worker processes went with it.
        deadline = time.monotonic() + 10
        while True:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, f"processes left in the server's group:\n{server.log()}"
            time.sleep(0.2)
        assert "Traceback" not in server.log()


# -- the import graph ------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    path: Path
    line: int
    deferred: bool  # inside a function: runs when called, not when the module is imported

    def __str__(self) -> str:
        shown = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        where = f"{shown}:{self.line}"
        return f"{self.importer} -> {self.imported} ({where}{', deferred' if self.deferred else ''})"


def modules_under(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for the tree at ``root`` imported as ``package``."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((package, *parts))] = path
    return modules


def project_modules() -> dict[str, Path]:
    return {**modules_under(PACKAGE, "trainserve"), **modules_under(MIGRATIONS, "trainserve.migrations")}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportsOf(ast.NodeVisitor):
    """The names a module's import statements reach for, each with the module each could be:
    ``from a.b import c`` is module ``a.b.c`` when there is one, else a name in ``a.b``."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[list[str], int, bool]] = []  # (candidates, line, deferred)
        self._functions = 0

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._functions += 1
        self.generic_visit(node)
        self._functions -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):  # annotations only: never runs
            for statement in node.orelse:
                self.visit(statement)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append(([alias.name], node.lineno, self._functions > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            anchor = self.package.rsplit(".", node.level - 1)[0] if node.level > 1 else self.package
            base = f"{anchor}.{base}" if base else anchor
        for alias in node.names:
            self.found.append(([f"{base}.{alias.name}", base], node.lineno, self._functions > 0))


def import_graph(modules: dict[str, Path]) -> list[Import]:
    """Every import from one of ``modules`` to another. Importing ``a.b.c`` also runs the
    ``__init__`` of ``a`` and ``a.b``: an edge to each, except to the importer's own parent
    packages, which are being imported already when it runs (the usual ``from
    trainserve.x.y import`` inside ``trainserve.x`` is no cycle); naming a parent package
    itself (``from trainserve import __version__``) is an edge to it."""
    edges: list[Import] = []
    for importer, path in modules.items():
        visitor = _ImportsOf(importer, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), str(path)))
        for candidates, line, deferred in visitor.found:
            target = next((name for name in candidates if name in modules), None)
            if target is None:
                parts = candidates[-1].split(".")
                target = next((p for i in range(len(parts), 0, -1) if (p := ".".join(parts[:i])) in modules), None)
            if target is None or target == importer:
                continue  # outside the project
            parts = target.split(".")
            passed = [".".join(parts[:i]) for i in range(1, len(parts))]
            for name in [*passed, target]:
                if name in modules and name != importer and (name == target or not importer.startswith(f"{name}.")):
                    edges.append(Import(importer, name, path, line, deferred))
    return list(dict.fromkeys(edges))  # one per statement, however many names it imports


def find_cycle(edges: list[Import]) -> list[Import]:
    """The imports that make one cycle, in order; empty when there is none."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, set()).add(edge.imported)
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        # graphlib lists each node before the node it is a predecessor (here: import) of.
        cycle: list[str] = list(reversed(error.args[1]))
        first = {(e.importer, e.imported): e for e in reversed(edges)}
        return [first[pair] for pair in itertools.pairwise(cycle)]
    return []


def test_no_import_cycle_among_the_package_modules() -> None:
    # Imports inside functions count too. They cannot fail at import time, but deferring one
    # is how a cycle gets hidden (store.py <-> object_store.py did that), and the rooms'
    # dependencies must point one way whichever import runs first. Imports under
    # `if TYPE_CHECKING:` never run and are left out (annotations may point anywhere).
    edges = import_graph(project_modules())
    # The walk sees the imports that matter, module-level and deferred.
    found = {(e.importer, e.imported, e.deferred) for e in edges}
    assert ("trainserve.cli", "trainserve.api.app", True) in found
    assert ("trainserve.jobs.worker", "trainserve.jobs.status", False) in found
    assert ("trainserve.migrations.env", "trainserve.db", False) in found
    cycle = find_cycle(edges)
    assert not cycle, "import cycle:\n  " + "\n  ".join(map(str, cycle))


def test_the_cycle_finder_sees_a_deferred_cycle_and_not_a_type_checking_one(tmp_path: Path) -> None:
    room = tmp_path / "house" / "room"
    room.mkdir(parents=True)
    (room / "__init__.py").write_text("")
    (room / "a.py").write_text("from house.room import b\nfrom . import c\n")
    (room / "b.py").write_text("def late() -> None:\n    from .a import thing\n")
    (room / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from house.room import a\n")
    edges = import_graph(modules_under(room, "house.room"))
    cycle = find_cycle(edges)
    assert [(e.importer, e.imported, e.deferred) for e in cycle] in (
        [("house.room.a", "house.room.b", False), ("house.room.b", "house.room.a", True)],
        [("house.room.b", "house.room.a", True), ("house.room.a", "house.room.b", False)],
    )
    assert "b.py:2, deferred" in str(cycle[0]) + str(cycle[1])
    assert not find_cycle([e for e in edges if e.importer != "house.room.b"])  # c's import is for types only


# -- what ships, and under which name ------------------------------------------------------------


def test_every_package_folder_is_listed_for_the_wheel() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"": "service", "trainserve.migrations": "migrations"}
    # A folder of modules without __init__.py is a namespace package, which the explicit
    # list below would leave out of the wheel without a word.
    for root in (PACKAGE, MIGRATIONS):
        loose = {path.parent for path in root.rglob("*.py")} - {path.parent for path in root.rglob("__init__.py")}
        assert not loose, f"modules in folders without __init__.py: {sorted(map(str, loose))}"
    folders = {name for name, path in project_modules().items() if path.name == "__init__.py"}
    assert sorted(setuptools["packages"]) == sorted(folders)


def test_nothing_is_importable_as_service() -> None:
    assert not (SOURCE_ROOT / "__init__.py").exists()
    # service/ holds the one package and nothing a finder would pick up beside it.
    beside = {p.name for p in SOURCE_ROOT.iterdir() if not p.name.endswith(".egg-info") and p.name != "__pycache__"}
    assert beside == {"trainserve"}
    skipped = {".venv", "build", "node_modules"}
    sources = [
        path
        for path in REPO.rglob("*.py")
        if not skipped & set(path.relative_to(REPO).parts) and not path.relative_to(REPO).parts[0].startswith(".")
    ]
    assert PACKAGE / "cli.py" in sources
    offenders = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            if any(name.split(".")[0] == "service" for name in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
        # ... nor starts a process on it: [sys.executable, "-m", "service", ...]
        text = path.read_text()
        if path != Path(__file__).resolve() and ('"-m", "service"' in text or "-m service" in text):
            offenders.append(f"{path.relative_to(REPO)}: python -m service")
    assert not offenders, f"imports of `service`: {offenders}"
