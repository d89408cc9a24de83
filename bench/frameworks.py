"""Benchmark: the engine against a plain torch loop, PyTorch Lightning's Trainer and skorch.

Issue #16, target 3. Same data, same network, same optimizer, same threads (1 unless
``--threads``), one process, run side by side:

    medium   200,000 x 20, MLP 20-128-128-2, CrossEntropyLoss, Adam, batch 256, 3 epochs
    small    20,000 x 10, MLP 10-64-64-1, MSELoss, Adam, batch 32, 10 epochs

    engine     ``trainserve.training.loop.train`` (what a job runs; its own loop choice)
    plain      bench/threads.py's plain loop
    lightning  ``lightning.Trainer`` (progress bar, logging, checkpointing, model summary off)
    skorch     ``skorch.NeuralNet`` (train_split None, no callbacks printing)

Lightning and skorch come from the ``bench`` extra (``pip install -e '.[bench]'``); a
peer that is not installed is skipped with a printed line. Times are ratios to the plain
loop; losses are the last epoch's mean training loss. Exit 1 when the engine is slower
than the plain loop by more than 10% (noise on a shared machine) or slower than a peer
that ran, or its loss is off the plain loop's by more than 10%.

    .venv/bin/python bench/frameworks.py --quick    # a quarter of the rows, a third of the epochs
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.threads import SHAPES, Shape, plain_loop, schema_for, spec_for  # noqa: E402
from trainserve.training import loop  # noqa: E402
from trainserve.training.spec import Limits, plan_training  # noqa: E402

FRAMEWORK_SHAPES = {
    "medium": SHAPES["medium"],
    "small": Shape("small", 20_000, 10, 64, 1, 32, 10, "MSELoss"),
}
PLAIN_SLACK = 1.10
LOSS_SLACK = 0.10


def network(shape: Shape) -> nn.Module:
    return nn.Sequential(
        nn.Linear(shape.features, shape.hidden),
        nn.ReLU(),
        nn.Linear(shape.hidden, shape.hidden),
        nn.ReLU(),
        nn.Linear(shape.hidden, shape.outputs),
    )


def loss_of(shape: Shape) -> nn.Module:
    return nn.CrossEntropyLoss() if shape.loss == "CrossEntropyLoss" else nn.MSELoss()


def run_engine(shape: Shape, x: np.ndarray, y: np.ndarray) -> tuple[float, float, str]:
    spec = spec_for(shape)
    plan = plan_training(spec, schema_for(shape), Limits(10**6, 10**9, 10**6))
    started = time.perf_counter()
    result = loop.train(spec, plan, x, y)
    return time.perf_counter() - started, result.history[-1].train_loss, result.loop


def run_lightning(shape: Shape, x: np.ndarray, y: np.ndarray) -> tuple[float, float, str]:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.loss_fn = network(shape), loss_of(shape)
            self.losses: list[float] = []
            self.epoch_losses: list[torch.Tensor] = []

        def training_step(self, batch: Any, _index: int) -> torch.Tensor:
            xb, yb = batch
            loss: torch.Tensor = self.loss_fn(self.net(xb), yb)
            self.epoch_losses.append(loss.detach())
            return loss

        def on_train_epoch_end(self) -> None:
            self.losses.append(float(torch.stack(self.epoch_losses).mean()))
            self.epoch_losses.clear()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=shape.batch, shuffle=True)
    module = Module()
    trainer = L.Trainer(
        max_epochs=shape.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    return time.perf_counter() - started, module.losses[-1], "Trainer"


def run_skorch(shape: Shape, x: np.ndarray, y: np.ndarray) -> tuple[float, float, str]:
    from skorch import NeuralNet

    torch.manual_seed(0)
    net = NeuralNet(
        network(shape),
        criterion=type(loss_of(shape)),
        optimizer=torch.optim.Adam,
        lr=1e-3,
        batch_size=shape.batch,
        max_epochs=shape.epochs,
        train_split=None,
        iterator_train__shuffle=True,
        verbose=0,
    )
    started = time.perf_counter()
    net.fit(x, y)
    return time.perf_counter() - started, float(net.history[-1, "train_loss"]), "NeuralNet"


PEERS = {"lightning": ("lightning", run_lightning), "skorch": ("skorch", run_skorch)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1/4 of the rows, 1/3 of the epochs")
    parser.add_argument("--shapes", default="medium,small")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    failures: list[str] = []
    print(f"threads {args.threads}; load average {os.getloadavg()[0]:.2f}")
    for name in args.shapes.split(","):
        shape = FRAMEWORK_SHAPES[name]
        if args.quick:
            shape = Shape(shape.name, shape.rows // 4, shape.features, shape.hidden, shape.outputs, shape.batch,
                          max(1, shape.epochs // 3), shape.loss)  # fmt: skip
        x, y = shape.data()
        plain_s, plain_loss = plain_loop(shape, x, y, args.threads)
        torch.set_num_threads(args.threads)
        engine_s, engine_loss, engine_loop = run_engine(shape, x, y)
        print(f"{name:7} plain      {plain_s:7.2f} s  1.00x  loss {plain_loss:.4f}")
        speed = plain_s / engine_s
        print(f"{name:7} engine     {engine_s:7.2f} s  {speed:4.2f}x  loss {engine_loss:.4f} ({engine_loop})")
        if engine_s > plain_s * PLAIN_SLACK:
            failures.append(f"{name}: the engine is slower than the plain loop")
        if abs(engine_loss - plain_loss) > LOSS_SLACK * max(abs(plain_loss), 1e-3):
            failures.append(f"{name}: the engine's loss is off the plain loop's")
        for peer, (package, run) in PEERS.items():
            if importlib.util.find_spec(package) is None:
                print(f"{name:7} {peer:10} skipped: {package} is not installed (pip install -e '.[bench]')")
                continue
            torch.set_num_threads(args.threads)
            seconds, loss, how = run(shape, x, y)
            print(f"{name:7} {peer:10} {seconds:7.2f} s  {plain_s / seconds:4.2f}x  loss {loss:.4f} ({how})")
            if engine_s > seconds:
                failures.append(f"{name}: {peer} beat the engine")
    for failure in failures:
        print(f"MISS {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
