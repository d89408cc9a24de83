"""Benchmark: uploading a large numeric CSV to the service against ``pandas.read_csv``.

The script writes a numeric CSV (about 40 MB by default: 16 float columns and an int
label), then, in each round and on the same file, times side by side:

    service   ``TrainserveClient.upload_dataset`` to a real ``trainserve serve`` on loopback (what
              the Python client and the CLI send: the file as the body of POST /datasets): the
              upload streamed to disk and hashed, parsed (pyarrow), typed, profiled, stored as
              .npz and recorded
    multipart the same upload as a multipart form (``curl -F file=@...``), for reference
    pandas    ``pandas.read_csv(path)`` alone: a parse into memory, nothing checked or stored
    parse     ``trainserve.datasets.tables.parse_csv`` alone (pyarrow read + typing)
    pyarrow   ``pyarrow.csv.read_csv(path)`` alone, for reference

Each upload's file differs by its last row, so the service never recognises a re-upload
(which shares the stored table and skips writing it). Best of the rounds is reported, with
the load average beside it (the machine is shared: figures taken under load are noisy).

Run from the repository root (pandas is in the ``bench`` extra):

    .venv/bin/pip install -c constraints.txt -e '.[bench]'
    .venv/bin/python bench/ingest.py                  # 40 MB, best of 3
    .venv/bin/python bench/ingest.py --mb 10 --repeat 2

Beside each best wall time, the best CPU time (this process and the server's, all threads):
under load the wall clock mostly measures the wait for a core, the CPU time the work done.
Exit status 1 when the service's upload (wall clock) is slower than pandas.read_csv on the
same file.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pyarrow.csv as pacsv

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainserve.client import TrainserveClient  # noqa: E402
from trainserve.datasets.tables import parse_csv  # noqa: E402

FEATURES = 16


def write_csv(path: Path, megabytes: float, seed: int = 0) -> int:
    """A numeric CSV of about ``megabytes`` MB; returns its row count."""
    rng = np.random.default_rng(seed)
    header = ",".join([*(f"x{j}" for j in range(FEATURES)), "label"]) + "\n"
    block = 20_000
    rows = 0
    with open(path, "w") as handle:
        handle.write(header)
        while handle.tell() < megabytes * 1_000_000:
            x = rng.normal(size=(block, FEATURES))
            y = rng.integers(0, 3, size=(block, 1))
            np.savetxt(handle, np.hstack([x, y]), delimiter=",", fmt=["%.6f"] * FEATURES + ["%d"])
            rows += block
    return rows


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_service(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "TRAINSERVE_DATA_DIR": str(workdir), "TRAINSERVE_MAX_UPLOAD_BYTES": str(2**31)}
    log = open(workdir / "serve.log", "ab")  # noqa: SIM115 (the child writes it until stopped)
    process = subprocess.Popen(
        [sys.executable, "-m", "trainserve", "serve", "--port", str(port), "--workers", "0", "--log-level", "warning"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((workdir / "serve.log").read_text(errors="replace")[-3000:])
        time.sleep(0.2)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, all its threads, from /proc
    (Linux); 0 where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(action: Callable[[], object], server_pid: int) -> tuple[float, float]:
    """Wall seconds, and CPU seconds of this process and the server together: on a shared,
    loaded machine the wall clock mostly measures the wait for a core, the CPU time the work."""
    cpu, server = time.process_time(), cpu_seconds(server_pid)
    start = time.perf_counter()
    action()
    wall = time.perf_counter() - start
    return wall, time.process_time() - cpu + cpu_seconds(server_pid) - server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=40.0, help="size of the generated CSV (default 40)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the best of each is reported (default 3)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        workdir = Path(tmp)
        base = workdir / "base.csv"
        rows = write_csv(base, args.mb)
        size = base.stat().st_size
        print(f"table: {rows} rows x {FEATURES + 1} columns, {size / 1e6:.1f} MB")
        process, url = start_service(workdir / "service")
        best: dict[str, float] = {}
        best_cpu: dict[str, float] = {}
        loads: list[float] = []
        try:
            with TrainserveClient(url, timeout=600) as client:
                for round_number in range(args.repeat):
                    base_bytes = base.read_bytes()
                    path = workdir / f"round-{round_number}.csv"
                    path.write_bytes(base_bytes + ("0," * FEATURES + f"{2 * round_number}\n").encode())
                    form_path = workdir / f"round-{round_number}-form.csv"
                    form_path.write_bytes(base_bytes + ("0," * FEATURES + f"{2 * round_number + 1}\n").encode())

                    def multipart(path: Path = form_path) -> None:
                        with open(path, "rb") as handle:
                            response = client.http.post("/datasets", files={"file": (path.name, handle)})
                        response.raise_for_status()

                    actions: dict[str, Callable[[], object]] = {
                        "pandas": lambda path=path: pd.read_csv(path),
                        "service": lambda path=path: client.upload_dataset(path),
                        "multipart": multipart,
                        "parse": lambda path=path: parse_csv(path),
                        "pyarrow": lambda path=path: pacsv.read_csv(path),
                    }
                    times = {key: timed(action, process.pid) for key, action in actions.items()}
                    loads.append(os.getloadavg()[0])
                    shown = ", ".join(f"{k} {wall:.3f} s" for k, (wall, _) in times.items())
                    print(f"round {round_number + 1}: {shown} (load average {loads[-1]:.1f})")
                    for key, (wall, cpu) in times.items():
                        best[key] = min(best.get(key, wall), wall)
                        best_cpu[key] = min(best_cpu.get(key, cpu), cpu)
                    path.unlink()
                    form_path.unlink()
        finally:
            stop(process)

    load = f"load average {min(loads):.1f}-{max(loads):.1f}"
    print(f"\nbest of {args.repeat} on {size / 1e6:.1f} MB, {os.cpu_count()} cores, {load}:")
    print(f"  {'':9s} {'wall':>7s} {'MB/s':>7s} {'':12s} {'CPU':>7s}")
    for key, value in best.items():
        cpu = best_cpu[key]
        print(
            f"  {key:9s} {value:6.3f}s {size / 1e6 / value:7.1f} {value / best['pandas']:5.2f}x pandas "
            f"{cpu:6.3f}s {cpu / best_cpu['pandas']:5.2f}x pandas"
        )
    ratio = best["service"] / best["pandas"]
    verdict = "OK" if ratio <= 1.0 else "SLOWER than pandas.read_csv"
    print(f"service upload / pandas.read_csv = {ratio:.2f} ({verdict})")
    return 0 if ratio <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
