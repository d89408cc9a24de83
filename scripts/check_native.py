"""CI check of the native path's C (run by .ci/run): for a matrix of specs, compile the
generated sources with -Wall -Wextra -Werror under gcc and clang, then link each spec's
train_steps and forward_rows with scripts/native_harness.c under AddressSanitizer and
UndefinedBehaviorSanitizer and run it.

The matrix: every optimizer variant the tests use x each task (classification, binary,
regression), 27 specs. Within a task the regression losses and label smoothing rotate and
each spec chains two activations, so every activation and every loss meets every task;
batch sizes (1 to 4, so partial batches), biases and gradient clipping vary across it.
The kernels are one file pasted into every unit, so what differs between specs is the
sequence of calls and the sizes: that is what the matrix varies. About a minute of CPU
time, spread over the cores (--jobs).

Usage: python scripts/check_native.py [--compilers gcc,clang] [--jobs N]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import numpy as np

# The optimizer variants come from the tests' list, so the C checked here is the C tested there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.small_models import NATIVE_OPTIMIZERS as OPTIMIZERS
from trainserve.training import native
from trainserve.training import spec as S

HARNESS = Path(__file__).with_name("native_harness.c")
WARNINGS = ["-Wall", "-Wextra", "-Werror"]
SANITIZE = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]

# Per task, rotating across the optimizers.
LOSSES: dict[str, list[Any]] = {
    "classification": ["CrossEntropyLoss", {"type": "CrossEntropyLoss", "label_smoothing": 0.1}],
    "binary": ["BCEWithLogitsLoss"],
    "regression": [
        "MSELoss",
        "L1Loss",
        {"type": "HuberLoss", "delta": 0.5},
        {"type": "SmoothL1Loss", "beta": 0.5},
        {"type": "SmoothL1Loss", "beta": 0.0},
    ],
}
ACTIVATIONS: list[Any] = [
    "Tanh",
    "ReLU",
    "Sigmoid",
    "GELU",
    {"type": "GELU", "approximate": "tanh"},
    "SiLU",
    "Mish",
    {"type": "ELU", "alpha": 0.5},
    {"type": "LeakyReLU", "negative_slope": 0.2},
    {"type": "Softplus", "beta": 2.0, "threshold": 5.0},
    "Identity",
]
IN_FEATURES = 3


def matrix() -> list[tuple[str, S.TrainSpec, S.Task]]:
    specs = []
    for o, optimizer in enumerate(OPTIMIZERS):
        for task, losses in LOSSES.items():
            out = {"classification": 3, "binary": 1, "regression": 2}[task]
            first, second = ACTIVATIONS[(2 * o) % len(ACTIVATIONS)], ACTIVATIONS[(2 * o + 1) % len(ACTIVATIONS)]
            layers = [
                {"type": "Linear", "out_features": 4, "bias": o % 3 != 0},
                first,
                {"type": "Linear", "out_features": 5},
                second,
                {"type": "Linear", "out_features": out, "bias": o % 2 == 0},
            ]
            fields = {
                "model": layers,
                "loss": losses[o % len(losses)],
                "optimizer": optimizer,
                "batch_size": 1 + o % 4,
                "clip_grad_norm": 0.5 if o % 2 else None,
            }
            specs.append((f"opt{o}-{task}", S.TrainSpec.model_validate(fields), cast(S.Task, task)))
    return specs


def run(command: list[str], cwd: Path) -> str | None:
    """None when the command succeeded, else what it printed."""
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    return None if done.returncode == 0 else f"$ {' '.join(command)}\n{done.stdout}{done.stderr}"


def check(name: str, spec: S.TrainSpec, task: S.Task, compilers: list[str], folder: Path) -> list[str]:
    work = folder / name
    work.mkdir()
    train, _ = native.generate(spec, IN_FEATURES, task)
    (work / "train.c").write_text(train)
    (work / "forward.c").write_text(native.generate_forward(spec.model, IN_FEATURES, task))
    failures = []
    for cc in compilers:
        for unit in ("train.c", "forward.c"):
            flags = [*native.CFLAGS, *WARNINGS, "-shared", "-o", f"{unit}.{cc}.so", unit, "-lm"]
            failures.append(run([cc, *flags], work))
    harness = [compilers[0], *SANITIZE, "-std=c99", "-o", "harness", "train.c", "forward.c", str(HARNESS), "-lm"]
    failures.append(run(harness, work) or run(["./harness"], work))
    if not any(failures) and len(compilers) > 1:
        answers = {cc: run_both(work, cc, spec, task) for cc in compilers}
        first = answers[compilers[0]]
        for cc, answer in answers.items():
            if any(not np.array_equal(a, b) for a, b in zip(first, answer, strict=True)):
                failures.append(f"{compilers[0]} and {cc} builds disagree in the last bits")
    return [f"{name}: {f}" for f in failures if f]


def run_both(work: Path, cc: str, spec: S.TrainSpec, task: S.Task) -> list[np.ndarray]:
    """The weights after a few steps of {cc}'s train_steps, then {cc}'s forward_rows on them:
    with -ffp-contract=off and no fast-math, every compiler's build gives the same bits."""
    rng = np.random.default_rng(0)
    abi = native.train_abi(spec, IN_FEATURES, task)
    params = [rng.uniform(-0.5, 0.5, size=shape).astype(np.float32) for shape in abi.param_shapes]
    states = [np.zeros(abi.slot_shape(s, shape), np.float32) for shape in abi.param_shapes for s in abi.slots]
    n = 3 * abi.batch_size + 2
    x = rng.normal(size=(n, IN_FEATURES)).astype(np.float32)
    y = rng.integers(0, abi.out_width, n) if task == "classification" else rng.uniform(0, 1, (n, abi.y_width))
    y = np.ascontiguousarray(y, dtype=np.int64 if task == "classification" else np.float32)
    mean, sd = np.zeros(IN_FEATURES, np.float32), np.ones(IN_FEATURES, np.float32)
    loss = np.zeros(1, np.float32)

    def pointers(arrays: list[np.ndarray]) -> Any:
        return (ctypes.c_void_p * max(len(arrays), 1))(*[a.ctypes.data for a in arrays])

    train = ctypes.CDLL(str(work / f"train.c.{cc}.so")).train_steps
    train.restype = ctypes.c_int
    train.argtypes = native._TRAIN_STEPS_ARGS
    fresh = ctypes.c_int(1)
    rc = train(
        pointers(params),
        pointers(states),
        x.ctypes.data,
        y.ctypes.data,
        None,
        mean.ctypes.data,
        sd.ctypes.data,
        n,
        n,
        0,
        -(-n // abi.batch_size),
        0.01,
        loss.ctypes.data,
        ctypes.byref(fresh),
    )
    assert rc == 0, rc
    forward = ctypes.CDLL(str(work / f"forward.c.{cc}.so")).forward_rows
    forward.restype = ctypes.c_int
    address, count = ctypes.c_void_p, ctypes.c_long
    forward.argtypes = [ctypes.POINTER(address), address, address, address, count, address]
    transposed = [np.ascontiguousarray(p.T) for p in params]
    out = np.zeros((n, native.forward_abi(spec.model, IN_FEATURES, task).out_width), np.float32)
    rc = forward(pointers(transposed), x.ctypes.data, mean.ctypes.data, sd.ctypes.data, n, out.ctypes.data)
    assert rc == 0, rc
    return [*params, loss, out]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compilers", default="gcc,clang")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    compilers = args.compilers.split(",")
    missing = [cc for cc in compilers if shutil.which(cc) is None]
    if missing:
        print(f"check_native: missing compiler(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    started, specs = time.monotonic(), matrix()
    with tempfile.TemporaryDirectory() as folder, ThreadPoolExecutor(args.jobs) as pool:
        results = pool.map(lambda item: check(*item, compilers, Path(folder)), specs)
        failures = [f for result in results for f in result]
    for failure in failures:
        print(failure, file=sys.stderr)
    elapsed = time.monotonic() - started
    print(
        f"check_native: {len(specs)} specs x {compilers} with -Werror, and the sanitized harness: "
        f"{len(failures)} failure(s) in {elapsed:.0f} s"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
