"""What `trainserve serve` and a worker import at start: not matplotlib, Alembic or the HTTP
client, which only some routes or commands use (issue #16: a start 1.45x a bare app's).

Structural, not timed: each check runs in a fresh interpreter and reads sys.modules.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

LAZY = ("matplotlib", "alembic", "httpx")


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
        # What `serve` runs before uvicorn takes over: the CLI, the app, the schema check.
        code = (
            "from trainserve import cli\n"
            "cli.build_parser(client_commands=not cli.SERVICE_COMMANDS.issuperset(['serve'])).parse_args(['serve'])\n"
            "from trainserve.api.app import create_app\n"
            "from trainserve.jobs import worker, rescuer\n"
            "from trainserve.storage import sweep\n"
            f"from trainserve.db import upgrade_to_head; upgrade_to_head({url!r})\n"
        )
        assert _imported_after(code) == []


def test_the_lazy_modules_arrive_when_first_used():
    # A plot imports matplotlib, a client command the HTTP client, a new database Alembic.
    assert _imported_after("from trainserve.serving import plots; plots._new_figure((200, 200))") == ["matplotlib"]
    assert _imported_after("from trainserve import cli; cli.build_parser()") == ["httpx"]
    with tempfile.TemporaryDirectory() as tmp:
        code = f"from trainserve.db import upgrade_to_head; upgrade_to_head('sqlite:///{Path(tmp) / 'new.db'}')"
        assert _imported_after(code) == ["alembic"]
