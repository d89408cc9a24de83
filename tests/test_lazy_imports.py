"""What `trainserve serve` and a worker import at start: not matplotlib (plots), Alembic (a
database to migrate), the HTTP client (client commands), Optuna (sweeps), pyarrow (uploads),
nor the queue drivers a SQLite queue does not use (redis, psycopg); and the API not torch,
which its warm-up loads once the app has started: issue #16, target 7, a start within 1.15x
of a bare app's (bench/start.py).

Structural, not timed: each check runs in a fresh interpreter and reads sys.modules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

LAZY = ("matplotlib", "alembic", "httpx", "optuna", "pyarrow", "redis", "psycopg")


def _imported_after(code: str) -> list[str]:
    probe = f"import json, sys\n{code}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    loaded = set(json.loads(out.stdout.splitlines()[-1]))
    return [name for name in LAZY if name in loaded]


@pytest.mark.timeout(300)
def test_serving_an_up_to_date_database_imports_no_plotting_migrations_or_http_client():
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'ts.db'}"
        subprocess.run(
            [sys.executable, "-c", f"from trainserve.db import upgrade_to_head; upgrade_to_head({url!r})"],
            check=True,
            timeout=120,
        )
        # What `serve` runs before uvicorn takes over: the CLI, Huey for the queue, the app,
        # the schema check.
        code = (
            "from trainserve import cli\n"
            "cli.build_parser(client_commands=not cli.SERVICE_COMMANDS.issuperset(['serve'])).parse_args(['serve'])\n"
            f"cli.import_huey({'sqlite:///' + str(Path(tmp) / 'queue.db')!r})\n"
            "from trainserve.api.app import create_app\n"
            "from trainserve.jobs import worker, rescuer\n"
            "from trainserve.storage import sweep\n"
            f"from trainserve.db import upgrade_to_head; upgrade_to_head({url!r})\n"
        )
        assert _imported_after(code) == []


@pytest.mark.timeout(300)
def test_the_api_answers_before_torch_is_loaded_and_its_warm_up_loads_it(tmp_path: Path):
    # What `serve` runs in the API process (cli._serve) up to the app's start, then the
    # warm-up the app's lifespan starts: torch arrives with it, and its state (what /readyz
    # reports under `models`) says so.
    probe = (
        "import json, sys\n"
        "from trainserve import cli\n"
        "cli.build_parser(client_commands=False).parse_args(['serve'])\n"
        f"cli.import_huey({'sqlite:///' + str(tmp_path / 'queue.db')!r})\n"
        "from trainserve.api.app import create_app\n"
        "from trainserve.api.runtime import Runtime\n"
        "from trainserve.storage import sweep\n"
        "from trainserve.db import upgrade_to_head\n"
        "from trainserve.config import get_settings\n"
        "upgrade_to_head(get_settings().resolved_database_url)\n"
        "app = create_app()\n"
        "runtime: Runtime = app.state.runtime\n"
        "before = ('torch' in sys.modules, runtime.warmup.state)\n"
        "runtime.warmup.start(None)\n"
        "assert runtime.warmup.wait(240)\n"
        "print(json.dumps([before, ['torch' in sys.modules, runtime.warmup.state]]))\n"
    )
    env = {**os.environ, "TRAINSERVE_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    before, after = json.loads(out.stdout.splitlines()[-1])
    assert before == [False, "loading"]
    assert after == [True, "ok"]


def test_the_lazy_modules_arrive_when_first_used():
    # A plot imports matplotlib, a client command the HTTP client, a new database Alembic,
    # a sweep's search space Optuna, an upload pyarrow.
    assert _imported_after("from trainserve.serving import plots; plots._new_figure((200, 200))") == ["matplotlib"]
    assert _imported_after("from trainserve import cli; cli.build_parser()") == ["httpx"]
    space = "from trainserve.sweeps.space import Param; Param('lr', 'log_uniform', (1e-4, 1e-1)).distribution()"
    assert _imported_after(space) == ["optuna", "redis"]  # Optuna imports redis itself, for its journal storage
    upload = (
        "import pathlib, tempfile; from trainserve.datasets.tables import parse_csv\n"
        "path = pathlib.Path(tempfile.mkdtemp()) / 't.csv'; path.write_text('x,y\\n1,a\\n2,b\\n')\n"
        "parse_csv(path).schema()"
    )
    assert _imported_after(upload) == ["pyarrow"]
    with tempfile.TemporaryDirectory() as tmp:
        code = f"from trainserve.db import upgrade_to_head; upgrade_to_head('sqlite:///{Path(tmp) / 'new.db'}')"
        assert _imported_after(code) == ["alembic"]


def test_huey_keeps_the_drivers_of_the_queue_it_is_for():
    # A Redis or PostgreSQL queue's process imports its driver with Huey; a SQLite queue's
    # process can still import both later (SQLAlchemy's psycopg for a PostgreSQL database).
    redis = "from trainserve.jobs.queue import import_huey; import_huey('redis://127.0.0.1:6379/0')"
    assert _imported_after(redis) == ["redis"]
    postgres = "from trainserve.jobs.queue import import_huey; import_huey('postgresql://u@127.0.0.1/db')"
    assert _imported_after(postgres) == ["psycopg"]
    later = "from trainserve.jobs.queue import import_huey; import_huey('sqlite:///q.db'); import redis, psycopg"
    assert _imported_after(later) == ["redis", "psycopg"]
