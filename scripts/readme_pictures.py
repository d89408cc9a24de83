"""Make the README's dashboard picture with the project itself: a real server trains the guide's models.

Starts ``trainserve serve`` (API + one worker) on a free port in a scratch folder, trains
the guide's two make_moons classifiers with the guide's own settings (the 2x30 Tanh MLP,
300 epochs, and the linear ``Linear(2,2)``, 50 epochs; SGD lr 0.001, batch size 1), checks
that the server draws their decision regions (``GET /models/{id}/plot.png``), then saves
``docs/images/dashboard.png``: the ``/ui`` page in Debian's headless Chromium, with both
jobs, the MLP's loss curve, and both models with their plots.

    .venv/bin/python scripts/readme_pictures.py

It needs Debian's Chromium (``apt-get install chromium``) and playwright (in the ``test``
extra), which drives that browser and downloads none. Exits non-zero when a job fails or
the server draws no plot.
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
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

from trainserve.client import TrainserveClient
from trainserve.examples import guide_moons_spec, make_moons, to_csv

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "TRAINSERVE_DATA_DIR": str(data_dir), "TRAINSERVE_PROGRESS_INTERVAL_S": "0.2"}
    env.pop("TRAINSERVE_API_KEY", None)
    command = [sys.executable, "-m", "trainserve", "serve", "--port", str(port), "--log-level", "warning"]
    with open(data_dir / "server.log", "wb") as log:
        process = subprocess.Popen(
            command, cwd=data_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become ready in 90 s")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def train_guide_models(url: str, csv: bytes) -> tuple[str, str]:
    """Train the linear classifier, then the MLP; returns (MLP job id, MLP model id)."""
    linear_layers = [{"type": "Linear", "out_features": 2}]
    linear = {**guide_moons_spec(), "name": "moons-linear", "model": linear_layers, "epochs": 50}
    mlp = {**guide_moons_spec(), "name": "moons-mlp"}
    with TrainserveClient(url, timeout=60) as ts:
        dataset = ts.upload_dataset(csv, "moons.csv")
        for name, spec in (("linear", linear), ("2x30 Tanh MLP", mlp)):
            job = ts.wait(ts.train({**spec, "dataset_id": dataset.id}).id, timeout=900)
            if job.status != "succeeded" or job.model_id is None:
                raise SystemExit(f"job {job.id} ended {job.status}: {job.error}")
            accuracy = ts.get_model(job.model_id).metrics.get("train_accuracy")
            print(f"{name}: {job.epoch} epochs, final loss {job.train_loss:.4f}, train accuracy {accuracy:.3f}")
    return job.id, job.model_id


def screenshot_dashboard(url: str, job_id: str, model_count: int, path: Path) -> None:
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(f"{url}/ui")
        page.wait_for_selector(f'tr[data-job-id="{job_id}"][data-status="succeeded"]')
        page.click(f'tr[data-job-id="{job_id}"]')
        page.wait_for_selector(f"#detail-id:text('{job_id}')")
        cards = page.locator(".model")
        cards.nth(model_count - 1).wait_for()
        for i in range(model_count):  # every plot fetched and decoded
            cards.nth(i).locator("img[data-testid=model-plot]").evaluate("img => img.decode()")
        page.screenshot(path=str(path), full_page=True)
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images", help="folder for the PNG files")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    x, y = make_moons(200, noise=0.05, seed=0)
    with tempfile.TemporaryDirectory(prefix="trainserve-pictures-") as scratch:
        process, url = start_server(Path(scratch))
        try:
            job_id, model_id = train_guide_models(url, to_csv(x, y, target="y").encode())
            plot = httpx.get(f"{url}/models/{model_id}/plot.png", timeout=120)
            if plot.status_code != 200 or plot.headers.get("content-type") != "image/png":
                print(f"the server drew no plot: GET /models/{{id}}/plot.png answered {plot.status_code}")
                return 1
            screenshot_dashboard(url, job_id, 2, args.out / "dashboard.png")
        finally:
            stop_server(process)
    print(f"wrote {args.out / 'dashboard.png'} ({(args.out / 'dashboard.png').stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
