"""Benchmark: training on a GPU, the engine against a bare torch loop on the same GPU.

The data lives on the GPU for both (one copy, moved once); per step a batch is gathered
from a device-resident permutation, with no host synchronisation until the epoch ends.
Model: MLP 32-W-W-1 (W = --width, default 1024) on --rows x 32 features, MSELoss, Adam,
batch --batch, one epoch after one warm-up epoch; optionally under bf16 autocast
(``"autocast": "bf16"`` in the spec, ``torch.autocast`` in the bare loop).

    .venv/bin/python bench/gpu.py                        # fp32
    .venv/bin/python bench/gpu.py --bf16                 # bf16 autocast
    .venv/bin/python bench/gpu.py --peak-tflops 989      # override the peak used for the share

Prints samples/s of both, their ratio, the achieved TFLOP/s (6 x parameters per sample,
forward + backward) and its share of the GPU's peak for the precision used. Exit status 1
when the engine is below 95% of the bare loop, 2 when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainserve.datasets.tables import ColumnInfo, TableSchema  # noqa: E402
from trainserve.training import loop  # noqa: E402
from trainserve.training.spec import Limits, TrainSpec, plan_training  # noqa: E402

FEATURES = 32
TARGET = 0.95
# Dense peak TFLOP/s by device name fragment: (fp32 without TF32, bf16 tensor cores).
PEAKS = {"H100": (67.0, 989.0), "H200": (67.0, 989.0), "A100": (19.5, 312.0), "L4": (30.3, 121.0)}


def bare(x: torch.Tensor, y: torch.Tensor, width: int, batch: int, bf16: bool) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(FEATURES, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)
    ).to(x.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.MSELoss()
    seconds = 0.0
    for _epoch in range(2):  # the first warms up kernels and the allocator
        torch.cuda.synchronize()
        started = time.perf_counter()
        perm = torch.randperm(len(x), device=x.device)
        total = torch.zeros((), device=x.device)
        for start in range(0, len(x), batch):
            idx = perm[start : start + batch]
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += loss.detach()
        float(total)
        seconds = time.perf_counter() - started
    return len(x) / seconds


def engine_run(x: np.ndarray, y: np.ndarray, width: int, batch: int, bf16: bool) -> float:
    spec = TrainSpec.model_validate(
        {
            "model": [
                {"type": "Linear", "out_features": width},
                "ReLU",
                {"type": "Linear", "out_features": width},
                "ReLU",
                {"type": "Linear", "out_features": 1},
            ],
            "loss": "MSELoss",
            "optimizer": {"type": "Adam", "lr": 1e-3},
            "epochs": 2,
            "batch_size": batch,
            "standardize": False,
            "device": "cuda",
            "autocast": "bf16" if bf16 else None,
        }
    )
    schema = TableSchema(
        len(x), [*(ColumnInfo(f"x{j}", "float64") for j in range(FEATURES)), ColumnInfo("y", "float64")]
    )
    plan = plan_training(spec, schema, Limits(10**6, 10**10, 10**6))
    ends: list[float] = []
    loop.train(spec, plan, x, y, on_epoch=lambda _r: ends.append(time.perf_counter()))
    return len(x) / (ends[1] - ends[0])  # the second epoch: warm, as the bare loop's


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense peak for this precision")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, FEATURES)).astype(np.float32)
    y = (np.sin(x[:, :8]).sum(axis=1, keepdims=True)).astype(np.float64)
    xd, yd = torch.from_numpy(x).cuda(), torch.from_numpy(y.astype(np.float32)).cuda()
    bare_rate = bare(xd, yd, args.width, args.batch, args.bf16)
    del xd, yd
    engine_rate = engine_run(x, y, args.width, args.batch, args.bf16)
    params = FEATURES * args.width + args.width + args.width * args.width + args.width + args.width + 1
    peak = args.peak_tflops
    if peak is None:
        peak = next((p[1 if args.bf16 else 0] for key, p in PEAKS.items() if key in name), None)
    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(f"{name}; {args.rows:,} x {FEATURES}, MLP 32-{args.width}-{args.width}-1, batch {args.batch}, {precision}")
    for label, rate in (("bare torch loop", bare_rate), ("trainserve engine", engine_rate)):
        tflops = rate * 6 * params / 1e12
        share = f"{tflops / peak:.1%} of {peak:.0f} TFLOP/s peak" if peak else "peak unknown (--peak-tflops)"
        print(f"{label:<18} {rate:>14,.0f} samples/s  {tflops:8.1f} TFLOP/s  {share}")
    ratio = engine_rate / bare_rate
    print(f"engine / bare: {ratio:.1%} (target {TARGET:.0%})")
    if ratio < TARGET:
        print(f"FAIL: the engine reaches {ratio:.1%} of the bare loop", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
