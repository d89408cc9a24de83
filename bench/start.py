"""Benchmark: how soon ``trainserve serve`` answers GET /healthz, against a bare uvicorn app that imports torch.

Side by side, alternating, ``--repeat`` times each (issue #16, target 7):

    bare      ``python -c "import torch, uvicorn; uvicorn.run(bench.bare_app.app)"``: the least a
              torch-serving Python process can start in
    serve     ``python -m trainserve serve`` (API + one worker) on a database already at the newest
              schema: a restart, the usual start
    fresh     the same on an empty folder: the first start also creates the database (Alembic
              runs, so it is imported); printed, not judged

Each time is from the process's spawn to the first 200 from /healthz. The figure judged
is the median of serve's times over the median of bare's; exit 1 above 1.15.

    .venv/bin/python bench/start.py --repeat 5
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.15
BARE = (
    "import sys, torch, uvicorn; sys.path.insert(0, {root!r}); from bench.bare_app import app; "
    "uvicorn.run(app, host='127.0.0.1', port={port}, log_level='warning')"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def time_to_health(command: list[str], port: int, cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"{command[:3]} exited with {proc.returncode} before answering")
            time.sleep(0.01)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve_command(port: int) -> list[str]:
    return [sys.executable, "-m", "trainserve", "serve", "--port", str(port), "--log-level", "warning"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSERVE_")}
    bare: list[float] = []
    serve: list[float] = []
    fresh: list[float] = []
    with tempfile.TemporaryDirectory(prefix="trainserve-start-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        for i in range(args.repeat):
            port = free_port()
            bare.append(time_to_health([sys.executable, "-c", BARE.format(root=str(ROOT), port=port)], port, data, env))
            port = free_port()
            if i == 0:  # the first start creates the database
                fresh.append(time_to_health(serve_command(port), port, data, env))
                continue
            serve.append(time_to_health(serve_command(port), port, data, env))
        if not serve:  # --repeat 1: one restart still
            port = free_port()
            serve.append(time_to_health(serve_command(port), port, data, env))
    ratio = statistics.median(serve) / statistics.median(bare)
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(f"bare   {' '.join(f'{t:.2f}' for t in bare)} s")
    print(f"serve  {' '.join(f'{t:.2f}' for t in serve)} s (restart: the database is at the newest schema)")
    print(f"fresh  {' '.join(f'{t:.2f}' for t in fresh)} s (first start: creates the database; not judged)")
    print(f"serve / bare = {ratio:.2f} (target <= {TARGET})")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
