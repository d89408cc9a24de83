"""Benchmark: how soon ``trainserve serve`` answers GET /healthz, against a bare uvicorn app that imports torch.

Side by side, in interleaved rounds, ``--repeat`` rounds (issue #16, target 7):

    bare      ``python -c "import torch, uvicorn; uvicorn.run(bench.bare_app.app)"``: the least a
              torch-serving Python process can start in
    serve     ``python -m trainserve serve`` (API + one worker) on a database already at the newest
              schema: a restart, the usual start
    fresh     the same on an empty folder: the first start also creates the database (Alembic
              runs, so it is imported); printed, not judged

Each time is from the process's spawn to the first 200 from /healthz, polled every 10 ms
over a plain socket (an HTTP client per poll would take CPU from the process timed). The
CPU time each process used until then (from /proc) is printed beside it: it moves far less
with the machine's load than the wall time does, and says what a start costs. Each
round runs bare and serve once, bare first in odd rounds and second in even ones, so that
a load that rises or falls during the run weighs on both alike; each process is stopped,
and serve's worker drained, before the next one starts. The figure judged is the median of
serve's times over the median of bare's; exit 1 above 1.15. The load average is printed
at the start and at the end: on a busy machine every start is slower, and the ratio is
what the two share.

serve answers /healthz before it has loaded torch (it loads it in the background right
after, for the first model: docs/performance-16.md, target 7), so the bench also waits for
serve's /readyz, which says "loading" until then, and prints that time beside the bare
app's: what a client waiting for a fast first prediction waits. Printed, not judged.

Before the rounds it byte-compiles the trainserve package (and bench/), as ``pip install``
does for an installed service; a checkout run with PYTHONDONTWRITEBYTECODE=1 would otherwise
compile every module at every start.

    .venv/bin/python bench/start.py --repeat 7
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

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


def healthy(port: int, path: str = "/healthz") -> bool:
    """One GET over a fresh connection: True on a 200, False if nobody listens yet (or not ready)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            return conn.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) a process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


Run = tuple[float, float, float]


def time_to_health(command: list[str], port: int, cwd: Path, env: dict[str, str], ready: str) -> Run:
    """Seconds from spawn to the first 200 from /healthz, the CPU seconds the process used till
    then, and seconds from spawn to the first 200 from ``ready`` (``/readyz`` for serve: torch
    and the model modules loaded; the same /healthz for the bare app, which loads all first)."""
    with tempfile.TemporaryFile() as output:
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            while not healthy(port):
                if proc.poll() is not None:
                    output.seek(0)
                    tail = output.read().decode(errors="replace")[-3000:]
                    raise RuntimeError(f"{command[:4]} exited with {proc.returncode} before answering:\n{tail}")
                time.sleep(0.01)
            health, cpu = time.perf_counter() - started, cpu_seconds(proc.pid)
            while not healthy(port, ready):
                if proc.poll() is not None or time.perf_counter() - started > 120:
                    raise RuntimeError(f"{command[:4]} never answered {ready} with a 200")
                time.sleep(0.01)
            return health, cpu, time.perf_counter() - started
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and wait: serve drains its worker first, and the next round must not overlap it."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def median(runs: list[Run], field: int) -> float:
    return statistics.median(run[field] for run in runs)


def bare_command(port: int) -> list[str]:
    return [sys.executable, "-c", BARE.format(root=str(ROOT), port=port)]


def serve_command(port: int) -> list[str]:
    return [sys.executable, "-m", "trainserve", "serve", "--port", str(port), "--log-level", "warning"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="rounds of bare + serve")
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSERVE_")}
    # As `pip install` does for a wheel (the Docker image's install): without the package's
    # bytecode, a checkout run with PYTHONDONTWRITEBYTECODE=1 (this project's machines set
    # it) compiles every trainserve module from source at every start, 0.2 s of CPU that no
    # installed service pays. The bare app's one module is compiled too.
    spec = importlib.util.find_spec("trainserve")
    assert spec is not None, "trainserve is not installed"
    assert spec.origin is not None, "trainserve is not installed"
    for folder in (Path(spec.origin).parent, ROOT / "bench"):
        compileall.compile_dir(folder, quiet=1)
    load_before = os.getloadavg()
    bare: list[Run] = []
    serve: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="trainserve-start-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        # The first start creates the database; every later one is a restart.
        port = free_port()
        fresh = time_to_health(serve_command(port), port, data, env, "/readyz")
        for i in range(max(1, args.repeat)):
            pair = [("bare", bare_command, "/healthz"), ("serve", serve_command, "/readyz")]
            for name, command, ready in pair if i % 2 == 0 else reversed(pair):
                port = free_port()
                (bare if name == "bare" else serve).append(time_to_health(command(port), port, data, env, ready))
    load_after = os.getloadavg()
    ratio = median(serve, 0) / median(bare, 0)
    cores = len(os.sched_getaffinity(0))
    print(f"load average (1 min) {load_before[0]:.2f} at the start, {load_after[0]:.2f} at the end; {cores} cores")
    for name, runs, note in (("bare", bare, ""), ("serve", serve, "; restarts")):
        walls = " ".join(f"{run[0]:.2f}" for run in runs)
        print(f"{name:6} median {median(runs, 0):.2f} s ({walls}{note}); CPU {median(runs, 1):.2f} s")
    print(f"fresh  {fresh[0]:.2f} s, CPU {fresh[1]:.2f} s (first start: creates the database; not judged)")
    print(f"CPU to the first answer, serve / bare = {median(serve, 1) / median(bare, 1):.2f} (printed, not judged)")
    print(
        f"serve ready (/readyz 200: torch and the model modules loaded in the background) median "
        f"{median(serve, 2):.2f} s, {median(serve, 2) / median(bare, 0):.2f}x the bare app (printed, not judged)"
    )
    print(f"serve / bare = {ratio:.2f} (target <= {TARGET}): {'met' if ratio <= TARGET else 'MISSED'}")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
