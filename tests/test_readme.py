"""README's quick path runs as written.

The shell and Python blocks that README.md marks with ``<!-- quick-path -->`` are read from
README.md itself (no copy that could drift) and run in order against a real ``trainserve
serve``, from a folder that has the repository's ``examples/``, as a user with the
virtualenv activated would. The one thing changed is the server's address: README's
``http://127.0.0.1:8000`` becomes the test server's (and ``TRAINSERVE_URL`` names it for the
CLI). Shell variables set by one block (``DATASET``, ``JOB``) reach the next ones, as in one
terminal. A ``# prints: TEXT`` line in a block says what its output must contain.

The quick-start commands themselves (virtualenv, pip) are what CI runs: the test checks that
``.ci/run`` runs README's test command character for character.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, Server, start_server, stop_server
from trainserve.client import TrainserveClient
from trainserve.examples import guide_moons_spec

README = REPO / "README.md"
README_URL = "http://127.0.0.1:8000"
# A marker comment, then a fenced block in the next lines (blank lines allowed between).
MARKED_BLOCK = re.compile(r"<!-- (?P<mark>[a-z: -]+?) -->\s*\n```(?P<lang>sh|python)\n(?P<code>.*?)\n```", re.DOTALL)


@dataclass(frozen=True)
class Block:
    mark: str
    lang: str
    code: str

    @property
    def expected(self) -> list[str]:
        """What the block's output must contain: its ``# prints: ...`` lines."""
        return [line.split("# prints: ", 1)[1] for line in self.code.splitlines() if line.startswith("# prints: ")]


def readme_blocks(mark: str) -> list[Block]:
    blocks = [Block(**match.groupdict()) for match in MARKED_BLOCK.finditer(README.read_text())]
    return [block for block in blocks if block.mark == mark]


def quick_start_command(which: str) -> str:
    (block,) = readme_blocks(f"quick-start: {which}")
    assert "\n" not in block.code, f"README's {which} command should be one line"
    return block.code


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("readme-server"))
    yield running
    stop_server(running)


def run_block(block: Block, *, url: str, cwd: Path, env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Run one block as README shows it; return its output and the environment after it."""
    code = block.code.replace(README_URL, url)
    if block.lang == "python":
        command = [sys.executable, "-c", code]
        state: Path | None = None
    else:
        # `set -a` exports what the block assigns, and `env -0` hands it to the next block.
        state = cwd / ".readme-env"
        command = ["bash", "-c", f"set -euo pipefail -a\n{code}\nenv -0 > {state}"]
    # The timeout only stops a hang: a block's speed is the machine's, not README's.
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"README block failed ({result.returncode}):\n{block.code}\n--- output:\n{output}"
    for text in block.expected:
        assert text in result.stdout, f"README block should print {text!r}:\n{block.code}\n--- output:\n{output}"
    if state is None:
        return output, env
    after = dict(item.split("=", 1) for item in state.read_text().split("\0") if "=" in item)
    return output, after


def test_the_quick_path_runs_as_written(readme_server: Server, tmp_path: Path) -> None:
    blocks = readme_blocks("quick-path")
    assert [block.lang for block in blocks].count("sh") >= 2
    assert any(block.lang == "python" for block in blocks)
    (tmp_path / "examples").symlink_to(REPO / "examples")
    # The virtualenv activated: its `trainserve` and `python3` come first on PATH.
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("TRAINSERVE_")},
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "TRAINSERVE_URL": readme_server.url,
    }
    for block in blocks:
        _, env = run_block(block, url=readme_server.url, cwd=tmp_path, env=env)

    # What the blocks left behind is what README says they make.
    for variable in ("DATASET", "JOB", "MODEL"):
        assert env.get(variable), f"the curl blocks should set {variable}"
    lines = (tmp_path / "predicted.csv").read_text().splitlines()
    assert len(lines) == len((REPO / "examples" / "moons.csv").read_text().splitlines())  # a header and 200 rows
    assert (tmp_path / "moons.png").read_bytes().startswith(b"\x89PNG")
    with TrainserveClient(readme_server.url) as ts:
        jobs = ts.list_jobs()
        assert {job.status for job in jobs} == {"succeeded"}, [(job.name, job.status, job.error) for job in jobs]
        assert {job.name for job in jobs} == {"moons", "guide-moons-linear", "guide-moons-mlp"}


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    command = quick_start_command("test")
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert command in ci_lines, f".ci/run should run README's test command as it is:\n{command}"


def test_the_quick_start_installs_the_pinned_cpu_torch_then_the_project() -> None:
    serve, test = quick_start_command("serve"), quick_start_command("test")
    pins = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("torch==")]
    assert len(pins) == 1
    setup = (
        "python3.11 -m venv .venv && "
        f".venv/bin/pip install --no-deps --index-url https://download.pytorch.org/whl/cpu {pins[0]} && "
        ".venv/bin/pip install -c constraints.txt -e "
    )
    for command in (serve, test):
        assert command.startswith(setup)
    assert serve.endswith(" -e . && .venv/bin/trainserve serve")
    assert test.endswith(" -e '.[test]' && .venv/bin/python -m pytest")


def test_readme_stays_a_front_page_whose_links_resolve() -> None:
    text = README.read_text()
    assert len(text.splitlines()) < 200
    for target in re.findall(r"\]\(((?:docs/)[^)#]+)", text):
        assert (REPO / target).exists(), f"README links to {target}, which does not exist"


# The other examples a new user meets first: the dashboard form's default spec and the
# request bodies that the OpenAPI page (Swagger's "Try it out") offers, on the shipped data.
def test_the_dashboard_and_openapi_examples_train_on_the_shipped_moons(readme_server: Server) -> None:
    with TrainserveClient(readme_server.url, timeout=60) as ts:
        dataset = ts.upload_dataset(REPO / "examples" / "moons.csv")
        schemas = ts.http.get("/openapi.json").json()["components"]["schemas"]
        (spec_example,) = schemas["TrainSpec"]["examples"]
        specs = {"dashboard": guide_moons_spec(), "openapi": spec_example}
        jobs = {origin: ts.train({**spec, "dataset_id": dataset.id, "epochs": 3}).id for origin, spec in specs.items()}
        for origin, job_id in jobs.items():
            job = ts.wait(job_id)
            assert job.status == "succeeded", f"the {origin} example spec failed: {job.error}"
        model_id = ts.wait(jobs["openapi"]).model_id
        assert model_id
        inputs_examples = schemas["PredictRequest"]["properties"]["inputs"]["examples"]
        assert inputs_examples
        for inputs in inputs_examples:
            response = ts.http.post("/predict", json={"model_id": model_id, "inputs": inputs})
            assert response.status_code == 200, f"the OpenAPI inputs example {inputs} fails: {response.text}"
