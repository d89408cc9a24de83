"""A clear start: the real ``trainserve`` CLI, started as a subprocess, says in one line what
is wrong with its settings, its database, its queue or its store, and logs where its data
lives (issue 12, point 3)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import Server, free_port

TIMEOUT_S = 300  # a shared machine (one start took 24 s at load 16): generous, never a measurement


def start(
    folder: Path, env: dict[str, str], *args: str, pythonpath: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``trainserve serve`` (or ``args``) in ``folder``, with only these TRAINSERVE_* variables."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSERVE_")}
    environment.update(env)
    if pythonpath is not None:
        environment["PYTHONPATH"] = str(pythonpath)
    command = [sys.executable, "-m", "trainserve", *(args or ("serve", "--port", str(free_port())))]
    return subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True, timeout=TIMEOUT_S)


def start_all(folder: Path, envs: list[dict[str, str]], pythonpath: Path | None = None) -> list[str]:
    """``trainserve serve`` once per environment, all at once (each waits on its own
    imports), each in a folder of its own under ``folder``; the one-line error of each."""
    folders = [folder / f"run-{i}" for i in range(len(envs))]
    for each in folders:
        each.mkdir()
    with ThreadPoolExecutor(len(envs)) as pool:
        runs = [pool.submit(start, each, env, pythonpath=pythonpath) for each, env in zip(folders, envs, strict=True)]
        results = [run.result() for run in runs]
    return [one_line_error(result) for result in results]


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The failed start's error: exit status 2, no traceback, and exactly one line that is not a log line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if " INFO " not in line and " WARNING " not in line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trainserve serve: error: "), lines
    return lines[0]


def test_a_bad_setting_names_the_variable_the_value_and_what_is_allowed(tmp_path: Path) -> None:
    upload, epochs_and_device, not_json = start_all(
        tmp_path,
        [
            {"TRAINSERVE_MAX_UPLOAD_BYTES": "abc"},
            {"TRAINSERVE_MAX_EPOCHS": "0", "TRAINSERVE_WORKER_DEVICE": "tpu"},
            {"TRAINSERVE_STORE_OPTIONS": "{anon: true}"},
        ],
    )
    assert "TRAINSERVE_MAX_UPLOAD_BYTES='abc'" in upload
    assert "integer" in upload
    assert "TRAINSERVE_MAX_EPOCHS='0'" in epochs_and_device
    assert "greater than 0" in epochs_and_device
    assert "TRAINSERVE_WORKER_DEVICE='tpu'" in epochs_and_device
    assert "cpu, cuda, cuda:N or mps" in epochs_and_device
    assert "TRAINSERVE_STORE_OPTIONS='{anon: true}' is not allowed: Expecting property name" in not_json
    assert not list(tmp_path.glob("*/trainserve*.db"))  # nothing left behind


def test_a_bad_api_key_is_named_but_never_shown(tmp_path: Path) -> None:
    weak, bad_pair, same_twice = "short-key", "alice:also-short", "same-key-0123456789"
    # Written backwards (key:name): the long key looks like a name, and must not be echoed as one.
    backwards = "3f9a1c7e5b2d4f6a8c0e1b3d5f7a9c2e:alice"
    short, pair, shared, reversed_pair = start_all(
        tmp_path,
        [
            {"TRAINSERVE_API_KEY": weak},
            {"TRAINSERVE_API_KEYS": f"ci:ci-key-0123456789abcdef,{bad_pair}"},
            {"TRAINSERVE_API_KEY": same_twice, "TRAINSERVE_API_KEYS": f"bob:{same_twice}"},
            {"TRAINSERVE_API_KEYS": backwards},
        ],
    )
    assert "TRAINSERVE_API_KEY=<hidden> is not allowed: TRAINSERVE_API_KEY must be at least 16" in short
    assert "TRAINSERVE_API_KEYS pair 2: the key (after the name and ':') must be at least 16 characters" in pair
    assert "two API keys are the same" in shared
    assert "TRAINSERVE_API_KEYS pair 1: the key (after the name and ':') must be at least 16" in reversed_pair
    for line, secret in (
        (short, weak),
        (pair, "also-short"),
        (pair, "ci-key"),
        (shared, same_twice),
        (reversed_pair, "3f9a1c7e5b2d4f6a"),
    ):
        assert secret not in line


def test_an_unusable_database_queue_or_store_is_named(tmp_path: Path) -> None:
    # The tests run as root, which may write anywhere: a path through a plain file is one
    # nobody can create.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()  # nobody listens there
    postgres = f"postgresql+psycopg://trainserve:s3cret@127.0.0.1:{port}/trainserve"
    lines = start_all(
        data,
        [
            {"TRAINSERVE_DATABASE_URL": f"sqlite:///{blocker}/x/trainserve.db"},
            {"TRAINSERVE_DATABASE_URL": f"sqlite:///{tmp_path}/missing/trainserve.db"},
            {"TRAINSERVE_DATABASE_URL": postgres},
            {"TRAINSERVE_QUEUE_URL": f"redis://127.0.0.1:{port}/0"},
            {"TRAINSERVE_STORE_DIR": str(blocker / "store")},
            {"TRAINSERVE_DATA_DIR": str(blocker / "data")},
        ],
    )
    through_a_file, missing_folder, nobody_answers, no_redis, store, data_dir = lines
    assert f"{blocker}/x/trainserve.db" in through_a_file
    assert "does not exist" in through_a_file
    assert f"{tmp_path}/missing/trainserve.db" in missing_folder
    assert not (tmp_path / "missing").exists()  # not created: a typo, or a volume not mounted
    assert f"database at postgresql+psycopg://trainserve:***@127.0.0.1:{port}/trainserve" in nobody_answers
    assert "s3cret" not in nobody_answers
    assert "refused" in nobody_answers.lower()
    assert f"queue at redis://127.0.0.1:{port}/0" in no_redis
    assert f"model store folder {blocker}/store" in store
    assert f"data folder {blocker}/data" in data_dir


BLOCK_IMPORTS = '''
import sys

class _Missing:
    """Acts as if the extras named in TRAINSERVE_TEST_MISSING were not installed."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _Missing())
'''


def test_a_url_whose_extra_is_missing_says_what_to_install(tmp_path: Path) -> None:
    # An extra that is not installed cannot be reached here (the test extra installs them
    # all): a sitecustomize on PYTHONPATH hides their modules from the started processes.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(BLOCK_IMPORTS.replace("{BLOCKED}", repr({"psycopg", "redis", "s3fs"})))
    cases = [
        ("TRAINSERVE_DATABASE_URL", "postgresql+psycopg://u:pw@127.0.0.1/db", "postgres"),
        ("TRAINSERVE_QUEUE_URL", "redis://127.0.0.1:6379/0", "redis"),
        ("TRAINSERVE_STORE_URL", "s3://bucket/models", "s3"),
    ]
    lines = start_all(tmp_path, [{variable: url} for variable, url, _ in cases], pythonpath=hide)
    for (variable, _, extra), line in zip(cases, lines, strict=True):
        assert f"pip install 'trainserve[{extra}]'" in line
        assert variable in line
        assert ":pw@" not in line


def test_serve_help_shows_the_defaults_and_where_the_data_lives(tmp_path: Path) -> None:
    result = start(tmp_path, {}, "serve", "--help")
    assert result.returncode == 0, result.stderr
    assert "(default: 8000)" in result.stdout
    assert "(default: 127.0.0.1)" in result.stdout
    assert f"data dir  {tmp_path.resolve()}" in result.stdout
    assert f"sqlite:///{tmp_path.resolve()}/trainserve.db" in result.stdout
    assert not (tmp_path / "trainserve.db").exists()  # help creates nothing
    # A bad setting does not take the help away (nor the client commands): it says what is wrong.
    bad = start(tmp_path, {"TRAINSERVE_STORE_OPTIONS": "{"}, "serve", "--help")
    assert bad.returncode == 0, bad.stderr
    assert "TRAINSERVE_STORE_OPTIONS='{' is not allowed" in bad.stdout


def test_the_first_log_lines_say_where_the_data_lives(server: Server) -> None:
    log = server.log()
    head = log[: log.index("store:")]  # before anything else the server logs: alembic, the workers
    assert f"data dir: {server.data_dir.resolve()}" in head
    database = server.env.get("TRAINSERVE_DATABASE_URL", f"sqlite:///{server.data_dir.resolve()}/trainserve.db")
    assert f"database: {database}" in head
    queue = server.env.get("TRAINSERVE_QUEUE_URL", f"sqlite:///{server.data_dir.resolve()}/trainserve-queue.db")
    assert f"queue:    {queue}" in head
    assert "alembic" not in head
    assert f"store:    {server.store_dir.resolve()}" in log
    new_database = f"no database was at {server.data_dir.resolve()}/trainserve.db: a new, empty one is created"
    # The server started in a fresh folder: a new SQLite database is announced, a Postgres one is not.
    assert (new_database in log) == ("TRAINSERVE_DATABASE_URL" not in server.env)


def test_an_existing_database_is_not_announced_as_new(tmp_path: Path) -> None:
    (tmp_path / "trainserve.db").touch()  # there already: an empty SQLite file is a database
    result = start(tmp_path, {}, "migrate")
    assert result.returncode == 0, result.stderr
    assert f"data dir: {tmp_path.resolve()}" in result.stderr
    assert f"database: sqlite:///{tmp_path.resolve()}/trainserve.db" in result.stderr
    assert "no database was at" not in result.stderr


def test_check_passes_on_a_node_whose_server_runs(server: Server, tmp_path: Path) -> None:
    # `trainserve check` is the worker's health check in docker-compose.yml and a node's in
    # docs/scaling-out.md: it checks what the node needs (database, store, queue) and never
    # loads a model, so it must not report the API's model warm-up as pending.
    result = start(tmp_path, {**server.env, "TRAINSERVE_DATA_DIR": str(server.data_dir.resolve())}, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["database: ok", "store: ok", "queue: ok"]
