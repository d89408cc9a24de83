"""Benchmark: one request of 65,536 rows against in-process ``model(x)`` on the same rows.

A trainserve server (one uvicorn process) serves the guide's 2x30 Tanh make_moons
classifier. The same 65,536 x 2 float32 rows are predicted

    in-process   ``model(torch.from_numpy(x))`` under inference_mode, in this process, with the
                 model loaded from the server's own store (the baseline: the faster of torch's
                 default thread count and one thread)
    .npy         POST /predict with a .npy body, answered as .npy (``Accept: application/x-npy``)
    JSON         POST /predict with ``{"model_id", "inputs": [[...], ...]}``, answered as JSON

Each HTTP figure is a whole client call: the body built, sent, parsed and checked by the
server, predicted, answered, and the answer parsed back into an array. Best of ``--repeat``.

    .venv/bin/python bench/predict_batch.py
    .venv/bin/python bench/predict_batch.py --rows 65536 --repeat 7

Exit status 1 when the .npy path reaches less than 50% of the in-process rate.
"""

from __future__ import annotations

import argparse
import gc
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import orjson
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.serving import data_dir, train_moons_model, trainserve  # noqa: E402
from trainserve.config import Settings  # noqa: E402
from trainserve.db import ModelRecord, make_engine, make_session_factory  # noqa: E402
from trainserve.serving.predictor import Predictor  # noqa: E402
from trainserve.storage.local import LocalStore  # noqa: E402

TARGET_RATIO = 0.50
NPY = "application/x-npy"


WARM_UP_CALLS = 100


def best_of(repeat: int, call: Callable[[], object]) -> float:
    # Warm up, the baseline as much as the service: model cached, code paths hot, and the
    # allocator past its first rounds of fresh pages for 8 MiB tensors (in this VM the
    # in-process pass took 6 ms for its first few dozen calls, 2.3 ms after).
    for _ in range(WARM_UP_CALLS):
        call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=65_536)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    folder = data_dir()
    print(f"training the moons classifier in {folder} ...", flush=True)
    model_id = train_moons_model(folder)
    x = np.random.default_rng(0).uniform(-1.5, 2.5, size=(args.rows, 2)).astype(np.float32)

    settings = Settings(data_dir=folder)
    sessions = make_session_factory(make_engine(settings.resolved_database_url))
    with sessions() as session:
        record = session.get(ModelRecord, model_id)
        assert record is not None
        module = Predictor.load(LocalStore(settings.resolved_store_dir), record).module

    def in_process() -> torch.Tensor:
        with torch.inference_mode():
            return module(torch.from_numpy(x))

    default_threads = torch.get_num_threads()
    baselines = {}
    for threads in sorted({default_threads, 1}):
        torch.set_num_threads(threads)
        baselines[threads] = best_of(args.repeat, in_process)
    threads, baseline = min(baselines.items(), key=lambda item: item[1])
    torch.set_num_threads(threads)
    with torch.inference_mode():
        expected = torch.softmax(module(torch.from_numpy(x)), dim=1).argmax(dim=1).numpy()

    # This process imported torch for the baseline, which a client would not have: keep those
    # objects out of the garbage collector's full passes while it parses answers.
    gc.freeze()
    with trainserve(folder) as server, httpx.Client(base_url=server.url, timeout=300) as http:

        def npy_call() -> np.ndarray:
            buffer = io.BytesIO()
            np.save(buffer, x, allow_pickle=False)
            response = http.post(
                "/predict",
                params={"model_id": model_id},
                content=buffer.getvalue(),
                headers={"Content-Type": NPY, "Accept": NPY},
            )
            response.raise_for_status()
            return np.load(io.BytesIO(response.content), allow_pickle=False)  # type: ignore[no-any-return]

        def json_call() -> np.ndarray:
            body = orjson.dumps({"model_id": model_id, "inputs": x}, option=orjson.OPT_SERIALIZE_NUMPY)
            response = http.post("/predict", content=body, headers={"Content-Type": "application/json"})
            response.raise_for_status()
            return np.asarray(orjson.loads(response.content)["predictions"])

        for call in (npy_call, json_call):  # the service answers the in-process model's labels
            if not np.array_equal(call(), expected):
                print(f"{call.__name__}: predictions differ from the in-process model's", file=sys.stderr)
                return 2
        npy_seconds = best_of(args.repeat, npy_call)
        json_seconds = best_of(args.repeat, json_call)

    rows = args.rows
    print(f"\n{rows:,} rows x 2 features, guide's 2x30 Tanh MLP, best of {args.repeat}")
    print(f"(in-process: {', '.join(f'{t} thread(s) {s * 1000:.1f} ms' for t, s in baselines.items())})")
    print(f"{'path':<34}{'ms':>9}{'rows/s':>14}{'vs in-process':>15}")
    for name, seconds in (
        (f"in-process model(x), {threads} thread(s)", baseline),
        (".npy in, .npy out over HTTP", npy_seconds),
        ("JSON in, JSON out over HTTP", json_seconds),
    ):
        print(f"{name:<34}{seconds * 1000:>9.1f}{rows / seconds:>14,.0f}{baseline / seconds:>14.0%}")
    ratio = baseline / npy_seconds
    verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
    print(f"\ntarget: .npy at >= {TARGET_RATIO:.0%} of in-process model(x): {ratio:.0%}, {verdict}")
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
