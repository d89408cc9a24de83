"""What the prediction benchmarks share: servers started as subprocesses, a trained model,
and the ``wrk`` load generator with CPU accounting.

``wrk`` (C, one event-loop thread; ``apt-get install wrk`` on Debian/Ubuntu) drives both
the trainserve server and the bare baseline with the same request. Its own CPU use is
measured and printed beside every figure, so a run where the generator (rather than the
server) was the limit shows itself.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainserve.examples import MOONS_MLP_LAYERS, make_moons, to_csv  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process (the API; not its worker children)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_ready(url: str, process: subprocess.Popen[bytes], path: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


@contextmanager
def running(command: list[str], env: dict[str, str], cwd: Path, ready_path: str) -> Iterator[Server]:
    port = free_port()
    command = [part.replace("{port}", str(port)) for part in command]
    with open(cwd / f"server-{port}.log" if cwd != ROOT else os.devnull, "wb") as log:
        process = subprocess.Popen(
            command, cwd=cwd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(f"http://127.0.0.1:{port}", process)
    try:
        _wait_ready(server.url, process, ready_path)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def trainserve(data_dir: Path, *, workers: int = 0, **settings: str) -> Iterator[Server]:
    """``trainserve serve`` on a free port; ``settings`` become TRAINSERVE_* variables."""
    env = {"TRAINSERVE_DATA_DIR": str(data_dir), **{f"TRAINSERVE_{k.upper()}": v for k, v in settings.items()}}
    command = [sys.executable, "-m", "trainserve", "serve", "--port", "{port}", "--log-level", "warning"]
    with running([*command, "--workers", str(workers)], env, data_dir, "/readyz") as server:
        yield server


@contextmanager
def bare_fastapi() -> Iterator[Server]:
    """The baseline: bench/bare_app.py under the same uvicorn (uvloop + httptools when installed)."""
    command = [sys.executable, "-m", "uvicorn", "bench.bare_app:app", "--port", "{port}", "--log-level", "warning"]
    with running(command, {}, ROOT, "/healthz") as server:
        yield server


def train_moons_model(data_dir: Path, *, rows: int = 400) -> str:
    """Train the guide's 2x30 Tanh make_moons classifier in a server with a worker; its id.
    The model stays in ``data_dir`` for the servers started next."""
    x, y = make_moons(rows, noise=0.1, seed=0)
    with trainserve(data_dir, workers=1) as server, httpx.Client(base_url=server.url, timeout=120) as http:
        dataset = http.post("/datasets", files={"file": ("moons.csv", to_csv(x, y).encode())}).json()
        spec = {
            "dataset_id": dataset["id"],
            "target": "label",
            "model": MOONS_MLP_LAYERS,
            "loss": "CrossEntropyLoss",
            "optimizer": {"type": "Adam", "lr": 0.01},
            "epochs": 10,
            "batch_size": 32,
        }
        job = http.post("/train", json=spec).json()
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.2)
            job = http.get(f"/jobs/{job['id']}").json()
        if job["status"] != "succeeded":
            raise RuntimeError(f"training failed: {job.get('error')}")
        model_id: str = job["model_id"]
        return model_id


def data_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="trainserve-bench-"))


# -- load generation ---------------------------------------------------------------------------


@dataclass
class Load:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    generator_cpu: float  # share of one core the generator used
    server_cpu: float  # share of one core the server used


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _duration_ms(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def wrk(server: Server, path: str, body: str, *, connections: int, seconds: float, threads: int = 1) -> Load:
    """``wrk -c connections`` POSTing ``body`` as JSON for ``seconds``: rate, latency, CPU shares."""
    if shutil.which("wrk") is None:
        raise SystemExit("the benchmark needs wrk: apt-get install wrk (or brew install wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            f'wrk.method = "POST"\nwrk.body = {_lua_string(body)}\nwrk.headers["Content-Type"] = "application/json"\n'
        )
    # A long timeout: on a busy machine a few answers take seconds, which wrk would count as errors.
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s"]
    command += ["--latency", "-s", script.name]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = server.cpu_seconds()
    start = time.monotonic()
    out = subprocess.run([*command, server.url + path], capture_output=True, text=True, check=True).stdout
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu = (server.cpu_seconds() - server_before) / wall
    os.unlink(script.name)
    generator_cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / wall
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    found = re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    percentiles = {p: _duration_ms(v, u) for p, v, u in found}
    errors_match = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(errors_match.group(1)) if errors_match else 0  # non-2xx answers
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    if errors:
        print(out, file=sys.stderr)
    return Load(rate, percentiles["50"], percentiles["99"], errors, generator_cpu, server_cpu)
