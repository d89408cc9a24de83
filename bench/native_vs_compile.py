"""Benchmark: one training step of the guide's MLP at batch 1 (and 16) on the CPU, three ways.

    eager     PyTorch as the guide writes it: zero_grad, forward, loss, backward, SGD step
    compile   the same step with the model and the loss under ``torch.compile`` and the
              optimizer step compiled too (PyTorch's recipe for compiling the optimizer);
              its compile time (the first steps) reported apart and left out of the per-step time
    native    trainserve's native loop (trainserve.training.native.NativeSteps): the whole step
              as generated C, 1,024 steps per Python call

All three run the guide's 2x30 Tanh MLP, CrossEntropyLoss and SGD (lr 0.001) over the same
make_moons rows in order, in one process, on one thread (torch.set_num_threads(1)). Each
prints microseconds per step and its ratio to eager measured in the same run: ratios are what
to read, since absolute times vary with the machine and (on a shared one) with its load.

Run from the repository root:

    .venv/bin/python bench/native_vs_compile.py
    .venv/bin/python bench/native_vs_compile.py --steps 2000 --repeat 5 --batch 1 16
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from trainserve.examples import MOONS_MLP_LAYERS, make_moons
from trainserve.training import loop, native, network
from trainserve.training import spec as S


def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_moons(n, noise=0.05, seed=0)
    return torch.from_numpy(x).float().contiguous(), torch.from_numpy(y).long().contiguous()


def setup(batch: int) -> tuple[S.TrainSpec, network.TabularNet, torch.optim.Optimizer]:
    spec = S.TrainSpec.model_validate(
        {
            "model": MOONS_MLP_LAYERS,
            "loss": "CrossEntropyLoss",
            "optimizer": {"type": "SGD", "lr": 0.001},
            "batch_size": batch,
        }
    )
    torch.manual_seed(0)
    model = network.TabularNet(spec.model, 2)
    return spec, model, loop.build_optimizer(spec.optimizer, model.net.parameters())


def best_of(repeat: int, run: Callable[[], None]) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def eager(batch: int, steps: int, x: torch.Tensor, y: torch.Tensor, repeat: int) -> float:
    _, model, optimizer = setup(batch)
    loss_fn = nn.CrossEntropyLoss()

    def run() -> None:
        for i in range(steps):
            r = (i * batch) % (len(x) - batch)
            optimizer.zero_grad()
            loss_fn(model(x[r : r + batch]), y[r : r + batch]).backward()
            optimizer.step()

    return best_of(repeat, run) / steps


def compiled(batch: int, steps: int, x: torch.Tensor, y: torch.Tensor, repeat: int) -> tuple[float, float]:
    _, model, optimizer = setup(batch)
    loss_fn = nn.CrossEntropyLoss()

    @torch.compile
    def forward_loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return loss_fn(model(xb), yb)

    @torch.compile(fullgraph=False)
    def optimizer_step() -> None:
        optimizer.step()

    def step(i: int) -> None:
        r = (i * batch) % (len(x) - batch)
        optimizer.zero_grad()
        forward_loss(x[r : r + batch], y[r : r + batch]).backward()
        optimizer_step()

    started = time.perf_counter()
    for i in range(3):  # compiles (and re-compiles once shapes and state settle)
        step(i)
    warmup = time.perf_counter() - started

    def run() -> None:
        for i in range(steps):
            step(i)

    return best_of(repeat, run) / steps, warmup


def native_loop(batch: int, steps: int, x: torch.Tensor, y: torch.Tensor, repeat: int) -> float:
    spec, model, optimizer = setup(batch)
    runner = native.NativeSteps(spec, 2, "classification", model, optimizer)
    rows = steps * batch
    xs, ys = x.repeat(-(-rows // len(x)), 1)[:rows].contiguous(), y.repeat(-(-rows // len(y)))[:rows].contiguous()
    loss_sum = torch.zeros(())

    def run() -> None:
        for start in range(0, steps, native.CHUNK_STEPS):
            runner.run(xs, ys, None, start, min(steps, start + native.CHUNK_STEPS), loss_sum)

    return best_of(repeat, run) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = data(200)
    print(f"torch {torch.__version__}, one thread, {args.steps} steps, best of {args.repeat}")
    for batch in args.batch:
        e = eager(batch, args.steps, x, y, args.repeat)
        c, warmup = compiled(batch, args.steps, x, y, args.repeat)
        n = native_loop(batch, args.steps, x, y, args.repeat)
        print(f"batch {batch:>3}: eager {e * 1e6:8.1f} us/step   1.00x")
        print(f"batch {batch:>3}: compile {c * 1e6:6.1f} us/step  {e / c:5.2f}x  (compiling: {warmup:.1f} s)")
        print(f"batch {batch:>3}: native {n * 1e6:7.1f} us/step  {e / n:5.2f}x   compile/native: {c / n:.0f}x")


if __name__ == "__main__":
    main()
