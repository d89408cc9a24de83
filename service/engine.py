"""The training engine: spec -> nn.Module, the guide's training loop made fast, metrics.

Knows torch and numpy; no HTTP, no SQL. The loop is the guide's ``simple_network``
(zero_grad, forward, loss, backward, step) with its overheads removed: the table becomes
tensors once and moves to the device once, every epoch gathers one shuffled copy from a
seeded permutation and slices batches out of it as views, and the running loss stays on
the device, read back once per epoch rather than once per step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from service import spec as S

_LAYERS: dict[str, type[nn.Module]] = {
    "Dropout": nn.Dropout,
    "ReLU": nn.ReLU,
    "Tanh": nn.Tanh,
    "Sigmoid": nn.Sigmoid,
    "GELU": nn.GELU,
    "SiLU": nn.SiLU,
    "Mish": nn.Mish,
    "ELU": nn.ELU,
    "LeakyReLU": nn.LeakyReLU,
    "Softplus": nn.Softplus,
    "Identity": nn.Identity,
}
_LOSSES: dict[str, type[nn.Module]] = {
    "MSELoss": nn.MSELoss,
    "L1Loss": nn.L1Loss,
    "HuberLoss": nn.HuberLoss,
    "SmoothL1Loss": nn.SmoothL1Loss,
    "CrossEntropyLoss": nn.CrossEntropyLoss,
    "BCEWithLogitsLoss": nn.BCEWithLogitsLoss,
}
_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "SGD": torch.optim.SGD,
    "Adam": torch.optim.Adam,
    "AdamW": torch.optim.AdamW,
    "RMSprop": torch.optim.RMSprop,
    "Adagrad": torch.optim.Adagrad,
}
_EVAL_CHUNK = 65_536


class TrainingCancelled(Exception):
    """Raised inside the loop when the caller's ``should_stop`` says so."""


class DeviceUnavailable(Exception):
    pass


# -- building ------------------------------------------------------------------------------


class Standardize(nn.Module):
    """(x - mean) / std with the training set's statistics, saved with the weights."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TabularNet(nn.Module):
    """The user's ``nn.Sequential`` behind an input scaler: raw feature rows in, outputs out."""

    def __init__(self, layers: list[Any], in_features: int) -> None:
        super().__init__()
        self.scaler = Standardize(in_features)
        self.net = build_sequential(layers, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(self.scaler(x))
        return out


def build_sequential(layers: list[Any], in_features: int) -> nn.Sequential:
    """Instantiate allow-listed layers, inferring each one's input width from the last."""
    modules: list[nn.Module] = []
    width = in_features
    for layer in layers:
        if isinstance(layer, S.Linear):
            modules.append(nn.Linear(width, layer.out_features, bias=layer.bias))
            width = layer.out_features
        elif isinstance(layer, S.BatchNorm1d):
            modules.append(nn.BatchNorm1d(width, **layer.kwargs()))
        elif isinstance(layer, S.LayerNorm):
            modules.append(nn.LayerNorm(width, **layer.kwargs()))
        else:
            modules.append(_LAYERS[layer.type](**layer.kwargs()))
    return nn.Sequential(*modules)


def build_loss(loss: Any) -> nn.Module:
    return _LOSSES[loss.type](**loss.kwargs())


def build_optimizer(optimizer: Any, params: Any) -> torch.optim.Optimizer:
    return _OPTIMIZERS[optimizer.type](params, **optimizer.kwargs())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {name!r} was asked for, but this worker has no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"device {name!r} was asked for, this worker has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailable("device 'mps' was asked for, but this worker has no MPS device")
    return device


# -- targets and metrics -------------------------------------------------------------------


def encode_targets(y: np.ndarray, task: S.Task, classes: list[Any] | None) -> torch.Tensor:
    """Raw label column(s) -> the tensor the loss expects."""
    if task == "regression":
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32).reshape(len(y), -1))
    assert classes is not None
    lookup = np.asarray(classes)
    flat = y.reshape(-1)
    if flat.dtype.kind == "f":
        flat = flat.astype(np.int64)
    index = np.searchsorted(lookup, flat)
    if task == "binary":
        return torch.from_numpy(index.astype(np.float32).reshape(-1, 1))
    return torch.from_numpy(index.astype(np.int64))


def outputs_to_probabilities(outputs: torch.Tensor, task: S.Task) -> torch.Tensor:
    if task == "binary":
        p = torch.sigmoid(outputs[:, 0])
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(outputs, dim=1)


@torch.inference_mode()
def evaluate(net: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, task: S.Task) -> dict[str, float]:
    """Loss and task metrics over a whole split, in eval mode, chunked to bound memory."""
    was_training = net.training
    net.eval()
    outputs = torch.cat([net(chunk) for chunk in torch.split(x, _EVAL_CHUNK)])
    net.train(was_training)
    metrics = {"loss": float(loss_fn(outputs, y))}
    if task == "classification":
        metrics["accuracy"] = float((outputs.argmax(dim=1) == y).float().mean())
    elif task == "binary":
        metrics["accuracy"] = float(((outputs > 0).float() == y).float().mean())
    else:
        error = outputs - y
        mse = (error**2).mean(dim=0)
        variance = ((y - y.mean(dim=0)) ** 2).mean(dim=0)
        r2 = torch.where(variance > 0, 1 - mse / variance.clamp_min(1e-30), torch.zeros_like(mse))
        metrics.update(mse=float(mse.mean()), mae=float(error.abs().mean()), r2=float(r2.mean()))
    return metrics


# -- training ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    train_loss: float
    val_loss: float | None = None
    val_metrics: dict[str, float] | None = None


@dataclass
class TrainedModel:
    module: TabularNet
    metrics: dict[str, Any]
    history: list[EpochReport]
    device: str
    train_seconds: float
    input_mean: list[float] | None
    input_std: list[float] | None
    notes: list[str] = field(default_factory=list)


def split_indices(n_rows: int, validation_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n_rows)
    n_val = math.floor(n_rows * validation_split)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _standardization(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0  # a constant column carries no signal; leave it centred, unscaled
    return mean.astype(np.float32), std.astype(np.float32)


def train(
    spec: S.TrainSpec,
    plan: S.TrainingPlan,
    x: np.ndarray,
    y: np.ndarray,
    *,
    on_epoch: Callable[[EpochReport], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    check_every_s: float = 0.5,
) -> TrainedModel:
    """Train the spec's network on feature matrix ``x`` and raw labels ``y``.

    ``on_epoch`` receives each epoch's losses; ``should_stop`` is polled about every
    ``check_every_s`` seconds, and a True answer raises TrainingCancelled.
    """
    started = time.perf_counter()
    device = resolve_device(spec.device)
    train_rows, val_rows = split_indices(len(x), spec.validation_split, spec.seed)
    x_train = x[train_rows] if len(val_rows) else x
    if spec.standardize:
        mean, std = _standardization(x_train)
    else:
        mean = np.zeros(x.shape[1], dtype=np.float32)
        std = np.ones(x.shape[1], dtype=np.float32)

    def to_device(rows: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        xs = x if rows is None else x[rows]
        ys = y if rows is None else y[rows]
        features = torch.from_numpy(((xs - mean) / std).astype(np.float32, copy=False))
        return features.to(device), encode_targets(ys, plan.task, plan.classes).to(device)

    xt, yt = to_device(train_rows if len(val_rows) else None)
    xv, yv = to_device(val_rows) if len(val_rows) else (None, None)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(spec.seed)
        model = TabularNet(spec.model, plan.in_features)
        net = model.net.to(device)
        loss_fn = build_loss(spec.loss)
        optimizer = build_optimizer(spec.optimizer, net.parameters())
        history = _loop(spec, net, loss_fn, optimizer, xt, yt, xv, yv, plan.task, on_epoch, should_stop, check_every_s)
        metrics = {f"train_{k}": v for k, v in evaluate(net, loss_fn, xt, yt, plan.task).items()}
        if xv is not None and yv is not None:
            metrics.update({f"val_{k}": v for k, v in evaluate(net, loss_fn, xv, yv, plan.task).items()})

    if not all(math.isfinite(v) for v in metrics.values()):
        raise FloatingPointError("the trained model's metrics are not finite; try a smaller learning rate")
    model.scaler.mean.copy_(torch.from_numpy(mean))
    model.scaler.std.copy_(torch.from_numpy(std))
    model.net = net.cpu()
    model.eval()
    return TrainedModel(
        module=model,
        metrics=metrics,
        history=history,
        device=str(device),
        train_seconds=time.perf_counter() - started,
        input_mean=mean.tolist() if spec.standardize else None,
        input_std=std.tolist() if spec.standardize else None,
    )


def _loop(
    spec: S.TrainSpec,
    net: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    xt: torch.Tensor,
    yt: torch.Tensor,
    xv: torch.Tensor | None,
    yv: torch.Tensor | None,
    task: S.Task,
    on_epoch: Callable[[EpochReport], None] | None,
    should_stop: Callable[[], bool] | None,
    check_every_s: float,
) -> list[EpochReport]:
    n = len(xt)
    # BatchNorm cannot normalise a batch of one: drop such a trailing batch.
    if any(isinstance(m, nn.BatchNorm1d) for m in net.modules()) and n % spec.batch_size == 1:
        n -= 1
    generator = torch.Generator().manual_seed(spec.seed)
    history: list[EpochReport] = []
    next_check = time.monotonic() + check_every_s
    for epoch in range(1, spec.epochs + 1):
        net.train()
        if spec.shuffle:
            order = torch.randperm(len(xt), generator=generator)[:n].to(xt.device)
            xe, ye = xt[order], yt[order]
        else:
            xe, ye = xt[:n], yt[:n]
        total = torch.zeros((), device=xt.device)
        batches = 0
        for xb, yb in zip(torch.split(xe, spec.batch_size), torch.split(ye, spec.batch_size), strict=True):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            batches += 1
            if should_stop is not None and time.monotonic() >= next_check:
                if should_stop():
                    raise TrainingCancelled
                next_check = time.monotonic() + check_every_s
        train_loss = float(total) / max(batches, 1)
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"the training loss became {train_loss} at epoch {epoch}; try a smaller learning rate"
            )
        report = EpochReport(epoch, train_loss)
        if xv is not None and yv is not None:
            val = evaluate(net, loss_fn, xv, yv, task)
            report = EpochReport(epoch, train_loss, val.pop("loss"), val)
        history.append(report)
        if on_epoch is not None:
            on_epoch(report)
    return history
