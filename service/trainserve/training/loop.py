"""The training loop: the guide's loop made fast, checkpoints, metrics (the network is ``network``).

Knows torch and numpy; no HTTP, no SQL. The loop is the guide's ``simple_network``
(zero_grad, forward, loss, backward, step) with its overheads removed: the table becomes
tensors once and moves to the device once, every epoch gathers one shuffled copy from a
seeded permutation and slices batches out of it as views, and the running loss stays on
the device, read back once per epoch rather than once per step.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from trainserve.errors import CheckpointMismatch, DeviceUnavailable, NativeUnavailable, TrainingDiverged
from trainserve.training import crossover, native
from trainserve.training import metrics as metrics_lib
from trainserve.training import spec as S
from trainserve.training import threads as T
from trainserve.training.network import TabularNet, outputs_to_probabilities

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
# Rows per evaluation forward pass. Small enough that a chunk's activations stay in the
# CPU's caches: 2,048 rows x 256 wide is 2 MiB. Measured on one thread over 125,000 rows
# (docs/performance-16.md): the 32-256-256-1 MLP took 0.22 s in chunks of 2,048 and 0.38-0.41 s
# in chunks of 8,192, the final pass being ~15% of a 3-epoch job at 8,192; 20-128-128-2
# 0.060 against 0.069-0.082 s.
_EVAL_CHUNK = 2_048
_STATS_CHUNK = 65_536
# The finished model's training metrics are computed over at most this many training rows,
# evenly spaced through the split. Over all of them, a forward pass of the whole split cost
# about a ninth of a 3-epoch job (1M rows, 32-256-256-1, batch 4,096: the engine at 0.90 of
# a plain loop, docs/performance-16.md); 262,144 rows estimate a mean loss or an accuracy to
# well under a thousandth, while validation and test metrics always use all their rows.
TRAIN_METRICS_ROWS = 1 << 18


class TrainingCancelled(Exception):
    """Raised inside the loop when the caller's ``should_stop`` says so: a stop, not an error."""


# -- building ------------------------------------------------------------------------------


def build_loss(loss: Any, targets: torch.Tensor | None = None, n_classes: int | None = None) -> nn.Module:
    """The loss module; class weights ('balanced' counted on ``targets``, the training rows' labels)."""
    kwargs = loss.kwargs()
    weight = getattr(loss, "weight", None)
    pos_weight = getattr(loss, "pos_weight", None)
    if weight is not None:
        assert n_classes is not None
        if weight == "balanced":
            assert targets is not None
            counts = torch.bincount(targets.cpu(), minlength=n_classes).double()
            weights = counts.sum() / (n_classes * counts.clamp_min(1))
            kwargs["weight"] = weights.float()
        else:
            kwargs["weight"] = torch.tensor(weight, dtype=torch.float32)
    if pos_weight is not None:
        if pos_weight == "balanced":
            assert targets is not None
            positives = float(targets.sum())
            negatives = float(len(targets)) - positives
            kwargs["pos_weight"] = torch.tensor([negatives / max(positives, 1.0)], dtype=torch.float32)
        else:
            kwargs["pos_weight"] = torch.tensor([float(pos_weight)], dtype=torch.float32)
    return _LOSSES[loss.type](**kwargs)


# torch's fused kernels: one pass over each parameter instead of a dozen small tensor ops
# per step. On CPU, Adam's step for a 20-128-128-2 MLP took 0.5 ms fused against 1.5 ms
# (a third of a batch-256 step); SGD with momentum 0.21 against 0.44 ms (measured, torch 2.13).
_FUSED = frozenset({"SGD", "Adam", "AdamW", "Adagrad"})


def build_optimizer(optimizer: Any, params: Any) -> torch.optim.Optimizer:
    params = list(params)
    kwargs = optimizer.kwargs()
    device = params[0].device.type if params else "cpu"
    if optimizer.type in _FUSED and device in ("cpu", "cuda"):
        try:
            return _OPTIMIZERS[optimizer.type](params, **kwargs, fused=True)  # type: ignore[call-arg]
        except (RuntimeError, ValueError):  # an option the fused kernel lacks: the plain one
            pass
    return _OPTIMIZERS[optimizer.type](params, **kwargs)


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
        return torch.from_numpy(np.array(y, dtype=np.float32).reshape(len(y), -1))  # a copy: y may be read-only
    assert classes is not None
    lookup = np.asarray(classes)
    flat = y.reshape(-1)
    if flat.dtype.kind == "f":
        flat = flat.astype(np.int64)
    index = np.searchsorted(lookup, flat)
    if task == "binary":
        return torch.from_numpy(index.astype(np.float32).reshape(-1, 1))
    return torch.from_numpy(index.astype(np.int64))


@torch.inference_mode()
def evaluate(
    net: nn.Module,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: S.Task,
    rows: torch.Tensor | None = None,
) -> dict[str, float]:
    """Loss and task metrics over a whole split (``rows`` of x and y, or all), in eval mode, chunked.

    Rows are gathered a chunk at a time, so no copy of the split is ever made, and each
    chunk's outputs go straight into one preallocated tensor: kept as a list of small
    tensors between the chunks' large activations, they stopped the allocator from reusing
    the activations' memory (measured at 1M rows x 256 wide: 1 GB more peak memory, and
    1.8x the time, from fresh pages for every chunk).
    """
    was_training = net.training
    net.eval()
    n = len(x) if rows is None else len(rows)
    outputs: torch.Tensor | None = None
    for start in range(0, n, _EVAL_CHUNK):
        stop = min(start + _EVAL_CHUNK, n)
        chunk = net(x[start:stop] if rows is None else x.index_select(0, rows[start:stop]))
        if outputs is None:
            outputs = chunk.new_empty((n, *chunk.shape[1:]))
        outputs[start:stop] = chunk
    assert outputs is not None, "evaluate needs at least one row"
    if rows is not None:
        y = y.index_select(0, rows)
    net.train(was_training)
    # Sums over the whole split: on several threads their last bits would depend on the
    # thread count the policy chose from the load (threads.one_thread), and so would early
    # stopping's comparisons of validation losses.
    with T.one_thread():
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


@torch.inference_mode()
def _outputs(net: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    was_training = net.training
    net.eval()
    chunks = [net(x.index_select(0, rows[start : start + _EVAL_CHUNK])) for start in range(0, len(rows), _EVAL_CHUNK)]
    net.train(was_training)
    return torch.cat(chunks)


def report(
    net: nn.Module, x: torch.Tensor, targets: torch.Tensor, y: np.ndarray, plan: S.TrainingPlan, rows: torch.Tensor
) -> dict[str, Any]:
    """The full metrics report (training.metrics) of ``rows``: computed once, after training."""
    outputs = _outputs(net, x, rows).float().cpu()
    if plan.task == "regression":
        truth = np.asarray(y, dtype=np.float64).reshape(len(y), -1)[rows.cpu().numpy()]
        return metrics_lib.regression_report(truth, outputs.numpy())
    assert plan.classes is not None
    probabilities = outputs_to_probabilities(outputs, plan.task).numpy()
    index = targets.index_select(0, rows).cpu().numpy().reshape(-1).astype(np.int64)
    return metrics_lib.classification_report(index, probabilities, plan.classes)


_HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss", "mae", "rmse", "r2")


def headline(full: dict[str, Any], prefix: str) -> dict[str, float]:
    """A report's single-number metrics as ``{prefix}_{name}`` (those that are defined)."""
    return {
        f"{prefix}_{name}": float(full[name])
        for name in _HEADLINE
        if isinstance(full.get(name), int | float) and math.isfinite(full[name])
    }


# -- training ------------------------------------------------------------------------------

_SCHEDULERS: dict[str, Any] = {
    "StepLR": torch.optim.lr_scheduler.StepLR,
    "MultiStepLR": torch.optim.lr_scheduler.MultiStepLR,
    "ExponentialLR": torch.optim.lr_scheduler.ExponentialLR,
    "CosineAnnealingLR": torch.optim.lr_scheduler.CosineAnnealingLR,
    "LinearLR": torch.optim.lr_scheduler.LinearLR,
    "ReduceLROnPlateau": torch.optim.lr_scheduler.ReduceLROnPlateau,
}
# Scheduler state the constructor rebuilds from the spec; JSON would mangle it (MultiStepLR's Counter).
_SCHEDULER_REBUILT = frozenset({"milestones"})
CHECKPOINT_FORMAT = 1


def warm_up() -> None:
    """Pay torch's one-off costs before the first job rather than inside it: the first
    optimizer a process builds imports torch._dynamo, a second or more on a small machine."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])


def build_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> Any:
    return None if scheduler is None else _SCHEDULERS[scheduler.type](optimizer, **scheduler.kwargs())


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
    loop: str = "eager"  # which training loop ran: "eager" or "native" (generated code)
    stopped_epoch: int | None = None  # early stopping: the epoch after which training stopped
    best_epoch: int | None = None  # early stopping: the epoch with the lowest validation loss
    # The full report (training.metrics) on the validation and test rows, by part.
    evaluation: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """A training run's whole state at a step or epoch boundary; enough to continue bit for bit.

    ``tensors`` (CPU, contiguous, unshared: safetensors can save them) hold the weights,
    optimizer state, random-generator states and the epoch's running loss; ``meta``
    (JSON-serialisable) holds the position, history, scheduler and early-stopping state.
    """

    epoch: int  # epochs fully completed (for progress display)
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


class TrainingPreempted(Exception):
    """Raised after ``on_checkpoint`` got a fresh checkpoint, because ``should_preempt`` said so."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__(f"training preempted after {checkpoint.epoch} epoch(s), step {checkpoint.meta['step']}")
        self.checkpoint = checkpoint


def split_indices(n_rows: int, validation_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n_rows)
    n_val = math.floor(n_rows * validation_split)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@dataclass(frozen=True)
class Split:
    """Row indices (sorted) of the training, validation and test parts of a table."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def split_rows(spec: S.TrainSpec, n_rows: int, labels: np.ndarray | None = None) -> Split:
    """The spec's split of ``n_rows`` rows, seeded by the spec. Without a test share or
    stratification it is ``split_indices``' split, so older specs split as they always did.
    Stratified: each class's rows (``labels``: class indices) are split on their own,
    validation and test shares rounded per class."""
    validation, test = spec.validation_share, spec.test_share
    empty = np.zeros(0, dtype=np.int64)
    stratify = spec.split is not None and spec.split.stratify and labels is not None
    if not stratify and test == 0:
        train, val = split_indices(n_rows, validation, spec.seed)
        return Split(train, val, empty)
    rng = np.random.default_rng(spec.seed)
    groups = [np.arange(n_rows)]
    if stratify and labels is not None:
        groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    parts: list[list[np.ndarray]] = [[], [], []]
    for rows in groups:
        order = rows[rng.permutation(len(rows))]
        rounding = round if stratify else math.floor
        n_test, n_val = int(rounding(len(rows) * test)), int(rounding(len(rows) * validation))
        parts[2].append(order[:n_test])
        parts[1].append(order[n_test : n_test + n_val])
        parts[0].append(order[n_test + n_val :])
    train, val, held = (np.sort(np.concatenate(p)).astype(np.int64) if p else empty for p in parts)
    return Split(train, val, held)


def _standardization(x: np.ndarray, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (float64 math, as numpy's) of ``rows`` of x, a chunk of rows at a time: no copy of x."""
    n = len(x) if rows is None else len(rows)

    def chunks() -> Iterator[np.ndarray]:
        for start in range(0, n, _STATS_CHUNK):
            yield x[start : start + _STATS_CHUNK] if rows is None else x[rows[start : start + _STATS_CHUNK]]

    mean = sum((c.sum(axis=0, dtype=np.float64) for c in chunks()), np.zeros(x.shape[1])) / n
    square = np.zeros(x.shape[1])
    for c in chunks():
        deviation = c.astype(np.float64) - mean
        square += (deviation * deviation).sum(axis=0)
    std = np.sqrt(square / n)
    std[std == 0] = 1.0  # a constant column carries no signal; leave it centred, unscaled
    return mean.astype(np.float32), std.astype(np.float32)


def _fingerprint(spec: S.TrainSpec, n_rows: int, n_features: int) -> str:
    """What a checkpoint must agree on to be resumed: the spec (device aside) and the data's shape."""
    fields = spec.model_dump(mode="json", exclude={"device", "loop"})
    blob = json.dumps([fields, n_rows, n_features], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _to_json(value: Any) -> Any:
    """Scheduler and optimizer state as strict JSON: non-finite floats and tuples tagged."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v) for v in value]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


class _EarlyStopping:
    def __init__(self, config: S.EarlyStopping) -> None:
        self.config = config
        self.best_loss = math.inf
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.best_weights: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, val_loss: float, net: nn.Module) -> bool:
        """Record one epoch's validation loss; True when patience has run out."""
        if val_loss < self.best_loss - self.config.min_delta:
            self.best_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            if self.config.restore_best_weights:
                self.best_weights = {k: _cpu_copy(v) for k, v in net.state_dict().items()}
            return False
        self.bad_epochs += 1
        return self.bad_epochs >= self.config.patience


class _Run:
    """Everything a training run changes as it goes, and so everything a checkpoint captures."""

    def __init__(
        self,
        spec: S.TrainSpec,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        device: torch.device,
        fingerprint: str,
    ) -> None:
        self.spec, self.net, self.optimizer, self.scheduler = spec, net, optimizer, scheduler
        self.device, self.fingerprint = device, fingerprint
        self.epoch = 0  # epochs completed
        self.step = 0  # batches completed in epoch ``epoch + 1``
        self.loss_sum = torch.zeros((), device=device)  # their losses, summed on the device
        self.generator = torch.Generator().manual_seed(spec.seed)  # draws each epoch's shuffle
        self.epoch_start_shuffle = self.generator.get_state()  # before this epoch's draw
        self.history: list[EpochReport] = []
        self.early = _EarlyStopping(spec.early_stopping) if spec.early_stopping else None
        self.stopped_epoch: int | None = None
        # The loop that trains this run: a resumed run keeps its checkpoint's (they round differently).
        self.loop: str | None = None

    def checkpoint(self) -> Checkpoint:
        tensors = {f"net.{k}": _cpu_copy(v) for k, v in self.net.state_dict().items()}
        optim = self.optimizer.state_dict()
        optim_plain: dict[str, dict[str, Any]] = {}
        for index, state in optim["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{index}.{key}"] = _cpu_copy(value)
                else:
                    optim_plain.setdefault(str(index), {})[key] = value
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        # Mid-epoch, the generator's state from before the epoch's draw, so resuming redraws the same order.
        shuffle = self.epoch_start_shuffle if self.step else self.generator.get_state()
        tensors["rng.shuffle"] = shuffle.clone()
        tensors["loss_sum"] = _cpu_copy(self.loss_sum)
        early: dict[str, Any] | None = None
        if self.early is not None:
            early = {
                "best_loss": self.early.best_loss,
                "best_epoch": self.early.best_epoch,
                "bad_epochs": self.early.bad_epochs,
            }
            for k, v in (self.early.best_weights or {}).items():
                tensors[f"best.{k}"] = v.clone()
        scheduler = None
        if self.scheduler is not None:
            scheduler = {k: v for k, v in self.scheduler.state_dict().items() if k not in _SCHEDULER_REBUILT}
        meta = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "step": self.step,
            "history": [[r.epoch, r.train_loss, r.val_loss, r.val_metrics] for r in self.history],
            "optimizer": {"param_groups": optim["param_groups"], "state": optim_plain},
            "scheduler": scheduler,
            "early_stopping": early,
            "stopped_epoch": self.stopped_epoch,
            "loop": self.loop,
        }
        return Checkpoint(self.epoch, tensors, _to_json(meta))

    def restore(self, checkpoint: Checkpoint) -> None:
        meta = _from_json(checkpoint.meta)
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("fingerprint") != self.fingerprint:
            raise CheckpointMismatch("the checkpoint was taken for another spec or dataset than this run")
        tensors = checkpoint.tensors
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for index, plain in meta["optimizer"]["state"].items():
            state.setdefault(int(index), {}).update(plain)
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
        if self.scheduler is not None and meta["scheduler"] is not None:
            self.scheduler.load_state_dict({**self.scheduler.state_dict(), **meta["scheduler"]})
        torch.set_rng_state(tensors["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.generator.set_state(tensors["rng.shuffle"])
        self.epoch, self.step = checkpoint.epoch, int(meta["step"])
        self.loss_sum = tensors["loss_sum"].to(self.device, copy=True)
        self.history = [EpochReport(e, t, v, m) for e, t, v, m in meta["history"]]
        self.stopped_epoch = meta["stopped_epoch"]
        self.loop = meta.get("loop")  # None in checkpoints from before it was kept
        if self.early is not None and meta["early_stopping"] is not None:
            early = meta["early_stopping"]
            self.early.best_loss, self.early.best_epoch = early["best_loss"], early["best_epoch"]
            self.early.bad_epochs = early["bad_epochs"]
            best = {k[5:]: v.clone() for k, v in tensors.items() if k.startswith("best.")}
            self.early.best_weights = best or None


class _Hooks:
    """Polls the caller's stop/preempt callbacks and hands out checkpoints on a clock."""

    def __init__(
        self,
        run: _Run,
        should_stop: Callable[[], bool] | None,
        check_every_s: float,
        should_preempt: Callable[[], bool] | None,
        on_checkpoint: Callable[[Checkpoint], None] | None,
        checkpoint_every_s: float | None,
    ) -> None:
        self.run, self.should_stop, self.should_preempt = run, should_stop, should_preempt
        self.on_checkpoint, self.check_every_s, self.checkpoint_every_s = (
            on_checkpoint,
            check_every_s,
            checkpoint_every_s,
        )
        now = time.monotonic()
        self.next_check = now + check_every_s
        self.next_checkpoint = now + (checkpoint_every_s or 0.0)

    def at_boundary(self) -> None:
        now = time.monotonic()
        if now >= self.next_check:
            if self.should_stop is not None and self.should_stop():
                raise TrainingCancelled
            if self.should_preempt is not None and self.should_preempt():
                checkpoint = self.run.checkpoint()
                if self.on_checkpoint is not None:
                    self.on_checkpoint(checkpoint)
                raise TrainingPreempted(checkpoint)
            self.next_check = time.monotonic() + self.check_every_s
        if self.on_checkpoint is not None and self.checkpoint_every_s is not None and now >= self.next_checkpoint:
            self.on_checkpoint(self.run.checkpoint())
            self.next_checkpoint = time.monotonic() + self.checkpoint_every_s


class Steps(Protocol):
    """Runs batches ``start`` to ``stop`` of an epoch, adding each step's loss to ``loss_sum``.

    The epoch's rows are ``x[order]`` (or ``x`` itself when ``order`` is None), gathered a
    batch at a time: the data is never copied per epoch.
    """

    name: str
    chunk_steps: int  # steps per call: checkpoints and polls fall between calls

    def run(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        order: torch.Tensor | None,
        start: int,
        stop: int,
        loss_sum: torch.Tensor,
    ) -> None: ...


class EagerSteps:
    """The guide's step, one batch at a time: zero_grad, forward, loss, backward, (clip), step."""

    name = "eager"
    chunk_steps = 1  # a checkpoint may fall between any two steps

    def __init__(
        self, spec: S.TrainSpec, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.batch_size, self.clip = spec.batch_size, spec.clip_grad_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.autocast = spec.autocast == "bf16"

    def run(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        order: torch.Tensor | None,
        start: int,
        stop: int,
        loss_sum: torch.Tensor,
    ) -> None:
        bs = self.batch_size
        for b in range(start, stop):
            if order is None:
                xb, yb = x[b * bs : (b + 1) * bs], y[b * bs : (b + 1) * bs]
            else:
                rows = order[b * bs : (b + 1) * bs]
                xb, yb = x.index_select(0, rows), y.index_select(0, rows)
            self.optimizer.zero_grad(set_to_none=True)
            if self.autocast:
                with torch.autocast(xb.device.type, dtype=torch.bfloat16):
                    loss = self.loss_fn(self.model(xb), yb)
            else:
                loss = self.loss_fn(self.model(xb), yb)
            loss.backward()
            if self.clip is not None:
                nn.utils.clip_grad_norm_(self.params, self.clip)
            self.optimizer.step()
            loss_sum += loss.detach()


def train(
    spec: S.TrainSpec,
    plan: S.TrainingPlan,
    x: np.ndarray,
    y: np.ndarray,
    *,
    on_epoch: Callable[[EpochReport], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    check_every_s: float = 0.5,
    resume: Checkpoint | None = None,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    checkpoint_every_s: float | None = None,
    should_preempt: Callable[[], bool] | None = None,
    init: dict[str, torch.Tensor] | None = None,
    split: Split | None = None,
    threads: T.ThreadChoice | None = None,
) -> TrainedModel:
    """Train the spec's network on feature matrix ``x`` and raw labels ``y``.

    ``split``: the rows to train on, validate on and test on (default: ``split_rows`` of
    the spec). Test rows never train; they are scored once, at the end, as are the
    validation rows (``TrainedModel.evaluation``).

    ``on_epoch`` receives each epoch's losses. ``should_stop`` and ``should_preempt`` are
    polled about every ``check_every_s`` seconds: the first answering True raises
    TrainingCancelled; the second hands a fresh checkpoint to ``on_checkpoint`` and raises
    TrainingPreempted. ``on_checkpoint`` also gets one every ``checkpoint_every_s`` seconds
    when that is set. ``resume`` continues from such a checkpoint; on CPU the result is the
    same, bit for bit, as a run that was never interrupted.

    ``init``: a warm start's parent weights (its whole state dict, ``spec.init_from``): the
    network's are loaded, and every other tensor (the input scaler's statistics, and any
    preprocessing state saved beside the network) too unless ``spec.refit``. Layers listed
    in ``spec.freeze`` keep their parameters bit for bit.
    ``threads``: torch's intra-op threads for this run
    (``trainserve.training.threads.choose``), applied and noted; None leaves the process's
    setting alone.
    """
    started = time.perf_counter()
    if threads is not None:
        T.apply(threads.threads)
    device = resolve_device(spec.device)
    targets = encode_targets(y, plan.task, plan.classes)
    if split is None:
        split = split_rows(spec, len(x), targets.numpy() if plan.task == "classification" else None)
    train_rows, val_rows = split.train, split.validation
    has_val = len(val_rows) > 0
    subset = len(train_rows) != len(x)  # some rows are held out
    fixed = x.shape[1] - len(plan.embeddings)  # columns before the embedded categories' indices
    if spec.standardize:
        mean, std = _standardization(x, train_rows if subset else None)
    else:
        mean = np.zeros(x.shape[1], dtype=np.float32)
        std = np.ones(x.shape[1], dtype=np.float32)
    if plan.embeddings:  # trained vectors need no scaling; the index columns are not scaled at all
        width = sum(dim for _, dim in plan.embeddings)
        mean = np.concatenate([mean[:fixed], np.zeros(width, dtype=np.float32)])
        std = np.concatenate([std[:fixed], np.ones(width, dtype=np.float32)])
    # One float32 copy of the table at most (none when the caller's matrix already is one), moved
    # to the device once; the split is index vectors into it, and the scaler runs on each batch.
    matrix = np.ascontiguousarray(x, dtype=np.float32)
    features = (torch.from_numpy(matrix) if matrix.flags.writeable else torch.tensor(matrix)).to(device)
    train_targets = targets if not subset else targets[torch.from_numpy(train_rows)]
    targets = targets.to(device)
    train_index = torch.from_numpy(train_rows).to(device) if subset else None
    val_index = torch.from_numpy(val_rows).to(device) if has_val else None

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(spec.seed)
        model = TabularNet(spec.model, plan.in_features, embeddings=list(plan.embeddings) or None)
        model.scaler.mean.copy_(torch.from_numpy(mean))
        model.scaler.std.copy_(torch.from_numpy(std))
        if init is not None:
            mean, std = _warm_start(model, init, spec)
        model.to(device)
        # What trains (and what checkpoints hold): the user's layers, and embeddings if any.
        net: nn.Module = model.net if model.embeddings is None else model
        loss_fn = build_loss(spec.loss, train_targets, len(plan.classes) if plan.classes is not None else None)
        loss_fn.to(device)
        optimizer = build_optimizer(spec.optimizer, [p for p in net.parameters() if p.requires_grad])
        scheduler = build_scheduler(spec.scheduler, optimizer)
        run = _Run(spec, net, optimizer, scheduler, device, _fingerprint(spec, len(x), plan.in_features))
        if resume is not None:
            run.restore(resume)
        data = _Data(features, targets, train_index, val_index)
        steps, notes = choose_steps(spec, plan, model, loss_fn, optimizer, device, data, run.loop)
        run.loop = steps.name
        if threads is not None:
            notes.append(threads.note())
        hooks = _Hooks(run, should_stop, check_every_s, should_preempt, on_checkpoint, checkpoint_every_s)
        _loop(run, steps, model, loss_fn, data, plan.task, on_epoch, hooks)
        if run.early is not None and run.early.best_weights is not None:
            net.load_state_dict(run.early.best_weights)
        if threads is not None and threads.source == "policy":
            # The final pass runs chunks of _EVAL_CHUNK rows, far larger than a batch: it
            # gets the threads that size and the cores free now allow (no waiting to sample).
            T.apply(T.choose(_EVAL_CHUNK * plan.n_parameters, wait=None).threads)
        metric_rows = train_index
        if len(train_rows) > TRAIN_METRICS_ROWS:
            spread = train_rows[np.arange(TRAIN_METRICS_ROWS, dtype=np.int64) * len(train_rows) // TRAIN_METRICS_ROWS]
            metric_rows = torch.from_numpy(spread).to(device)
            notes.append(
                f"training metrics: over {TRAIN_METRICS_ROWS:,} of the {len(train_rows):,} training rows, evenly "
                "spaced (validation and test metrics use all of theirs)"
            )
        train_metrics = evaluate(model, loss_fn, features, targets, plan.task, metric_rows)
        metrics = {f"train_{k}": v for k, v in train_metrics.items()}
        if val_index is not None:
            val_metrics = evaluate(model, loss_fn, features, targets, plan.task, val_index)
            metrics.update({f"val_{k}": v for k, v in val_metrics.items()})
        evaluation = {}
        for part, rows in (("validation", split.validation), ("test", split.test)):
            if len(rows):
                evaluation[part] = report(model, features, targets, y, plan, torch.from_numpy(rows).to(device))
        if "test" in evaluation:  # the validation rows' loss and accuracy are there already; the rest in evaluation
            metrics.update(headline(evaluation["test"], "test"))

    if not all(math.isfinite(v) for v in metrics.values()):
        raise TrainingDiverged("the trained model's metrics are not finite; try a smaller learning rate")
    best_epoch = run.early.best_epoch if run.early is not None else None
    if run.stopped_epoch is not None:
        notes.append(f"early stopping: stopped after epoch {run.stopped_epoch}; best epoch {best_epoch}")
    if run.early is not None and run.early.best_weights is not None:
        notes.append(f"early stopping: the saved weights are epoch {best_epoch}'s")
    if resume is not None:
        notes.append(f"resumed from a checkpoint after epoch {resume.epoch}, step {resume.meta['step']}")
    if spec.autocast is not None:
        notes.append(f"autocast: forward and loss in {spec.autocast}")
    if init is not None:
        kept = "refitted on this data" if spec.refit else "kept from the parent"
        notes.append(f"warm start from model {spec.init_from}; preprocessing statistics {kept}")
    if spec.freeze:
        notes.append(f"frozen layers: {', '.join(str(i) for i in spec.freeze)}")
    model.cpu()
    model.eval()
    return TrainedModel(
        module=model,
        metrics=metrics,
        history=run.history,
        device=str(device),
        train_seconds=time.perf_counter() - started,
        input_mean=mean.tolist() if spec.standardize else None,
        input_std=std.tolist() if spec.standardize else None,
        notes=notes,
        loop=steps.name,
        stopped_epoch=run.stopped_epoch,
        best_epoch=best_epoch,
        evaluation=evaluation,
    )


def _warm_start(model: TabularNet, init: dict[str, torch.Tensor], spec: S.TrainSpec) -> tuple[np.ndarray, np.ndarray]:
    """Load the parent's weights into ``model`` (see ``train``); freeze the spec's layers.
    Returns the input scaler's mean and std as they now are."""
    model.net.load_state_dict({k[4:]: v for k, v in init.items() if k.startswith("net.")})
    if not spec.refit:
        # Every non-network tensor: the scaler today, and whatever preprocessing is saved
        # beside the network tomorrow, as long as its name and shape are the same.
        own = model.state_dict()
        for key, value in init.items():
            if not key.startswith("net.") and key in own and own[key].shape == value.shape:
                own[key].copy_(value)
    for index in spec.freeze or []:
        for parameter in model.net[index].parameters():
            parameter.requires_grad_(False)
    return model.scaler.mean.numpy().copy(), model.scaler.std.numpy().copy()


def choose_steps(
    spec: S.TrainSpec,
    plan: S.TrainingPlan,
    model: TabularNet,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    data: _Data,
    resumed: str | None = None,
) -> tuple[Steps, list[str]]:
    """The faster loop this spec can run on, and a note saying which one it is and why.

    ``resumed``: the loop a checkpoint being resumed ran, which this run keeps (the spec's
    ``loop: eager`` aside). Otherwise native where it can run and TRAINSERVE_NATIVE_CHOICE
    allows, and where ``measure`` (the default) says so: see ``crossover``."""
    eager = EagerSteps(spec, model, loss_fn, optimizer)
    reason = native.unsupported_reason(spec, device)
    if reason is None and spec.freeze:
        reason = "freeze keeps layers fixed, which the native loop does not"
    if reason is None and plan.embeddings:
        reason = "category embeddings train in eager PyTorch"
    choice = native.native_settings().native_choice
    if reason is None and resumed == "eager":
        reason = "the checkpoint this run resumes from ran eager"
    elif reason is None and resumed is None and choice == "eager":
        reason = "TRAINSERVE_NATIVE_CHOICE=eager"
    if reason is not None:
        return eager, [f"training loop: eager PyTorch ({reason})"]
    try:
        started, measured = time.perf_counter(), False
        if resumed == "native":
            why = "the checkpoint this run resumes from ran native"
        elif choice == "native":
            why = "TRAINSERVE_NATIVE_CHOICE=native"
        else:
            figures, measured = _measured(spec, plan, model, loss_fn, optimizer, data)
            if figures.loop == "eager":
                return eager, [f"training loop: eager PyTorch (faster here: {figures.describe()})"]
            why = f"faster here: {figures.describe()}"
        steps = native.NativeSteps(spec, plan.in_features, plan.task, model, optimizer)
        took = time.perf_counter() - started
        how = f"compiled in {took:.2f} s" if not steps.cached else "from the on-disk cache"
        if measured:  # the measurement loaded (and maybe compiled) the library
            how = f"compiled if not cached and measured in {took:.2f} s"
        return steps, [
            f"training loop: native (the whole step as generated C, {steps.chunk_steps} steps per call; {how}; {why})"
        ]
    except NativeUnavailable as exc:
        return eager, [f"training loop: eager PyTorch ({exc})"]


def _measured(
    spec: S.TrainSpec,
    plan: S.TrainingPlan,
    model: TabularNet,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: _Data,
) -> tuple[crossover.Figures, bool]:
    """This shape's kept measurement on this machine, taken now on throwaway copies of the
    network and optimizer if there is none yet; and whether it was taken now."""
    source, _ = native.generate(spec, plan.in_features, plan.task)
    figures = crossover.lookup(source)
    if figures is not None:
        return figures, False
    # Copies, so the job's weights, optimizer state and random streams are untouched (fresh
    # optimizers: load_state_dict would share the job's state tensors, not copy them).
    with torch.random.fork_rng(devices=[]):
        copies = []
        for _ in range(2):
            twin = copy.deepcopy(model)
            twin_net: nn.Module = twin.net if twin.embeddings is None else twin
            twin_optimizer = build_optimizer(spec.optimizer, [p for p in twin_net.parameters() if p.requires_grad])
            copies.append((twin, twin_optimizer))
        (eager_model, eager_optimizer), (native_model, native_optimizer) = copies
        eager = EagerSteps(spec, eager_model, loss_fn, eager_optimizer)
        fast = native.NativeSteps(spec, plan.in_features, plan.task, native_model, native_optimizer)
        rows = data.train_rows if data.train_rows is not None else torch.arange(len(data.x))
        measured = crossover.measure(eager, fast, data.x, data.y, rows, spec.batch_size)
    return crossover.record(source, measured), True


@dataclass(frozen=True)
class _Data:
    """The whole table on the training device, and the split as row indices into it."""

    x: torch.Tensor
    y: torch.Tensor
    train_rows: torch.Tensor | None  # None: every row trains
    val_rows: torch.Tensor | None

    @property
    def n_train(self) -> int:
        return len(self.x) if self.train_rows is None else len(self.train_rows)


def _loop(
    run: _Run,
    steps: Steps,
    model: nn.Module,
    loss_fn: nn.Module,
    data: _Data,
    task: S.Task,
    on_epoch: Callable[[EpochReport], None] | None,
    hooks: _Hooks,
) -> None:
    spec, net = run.spec, run.net
    n = data.n_train
    # BatchNorm cannot normalise a batch of one: drop such a trailing batch.
    if any(isinstance(m, nn.BatchNorm1d) for m in net.modules()) and n % spec.batch_size == 1:
        n -= 1
    n_batches = -(-n // spec.batch_size)
    while run.epoch < spec.epochs and run.stopped_epoch is None:
        epoch = run.epoch + 1
        model.train()
        run.epoch_start_shuffle = run.generator.get_state()
        x, y = data.x, data.y
        order: torch.Tensor | None
        if spec.shuffle:
            order = torch.randperm(data.n_train, generator=run.generator)[:n].to(x.device)
            if data.train_rows is not None:
                order = data.train_rows[order]
        elif data.train_rows is not None:
            order = data.train_rows[:n]
        else:
            order, x, y = None, x[:n], y[:n]
        while run.step < n_batches:
            stop = min(n_batches, run.step + steps.chunk_steps)
            steps.run(x, y, order, run.step, stop, run.loss_sum)
            run.step = stop
            hooks.at_boundary()
        train_loss = float(run.loss_sum) / max(n_batches, 1)
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"the training loss became {train_loss} at epoch {epoch}; try a smaller learning rate"
            )
        report = EpochReport(epoch, train_loss)
        if data.val_rows is not None:
            val = evaluate(model, loss_fn, data.x, data.y, task, data.val_rows)
            report = EpochReport(epoch, train_loss, val.pop("loss"), val)
        run.history.append(report)
        run.epoch, run.step = epoch, 0
        run.loss_sum.zero_()
        if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            run.scheduler.step(report.val_loss if report.val_loss is not None else train_loss)
        elif run.scheduler is not None:
            run.scheduler.step()
        if run.early is not None and report.val_loss is not None and run.early.update(epoch, report.val_loss, net):
            run.stopped_epoch = epoch
        if on_epoch is not None:
            on_epoch(report)
        hooks.at_boundary()
