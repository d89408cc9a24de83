"""Tiny models trained on the CPU in seconds, shared by the training and serving unit tests:
spec and plan helpers, ``fit`` (parse, plan, train), loading a trained model as the API does,
and the checkpoint round trip."""

from __future__ import annotations

import json
import typing
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainserve.datasets.tables import Table
from trainserve.examples import make_moons, make_wave
from trainserve.serving.predictor import Predictor
from trainserve.storage.base import new_id
from trainserve.storage.local import LocalStore
from trainserve.training import loop
from trainserve.training import spec as S

LIMITS = S.Limits(max_epochs=1_000, max_parameters=1_000_000, max_layer_width=1_024)
# Every optimizer variant the native path generates code for: tests/training/test_native.py
# checks each against eager PyTorch, and scripts/check_native.py compiles each under the
# sanitizers, so both cover the same list.
NATIVE_OPTIMIZERS: list[Any] = [
    "SGD",
    {"type": "SGD", "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
    {"type": "SGD", "momentum": 0.9, "nesterov": True},
    "Adam",
    {"type": "Adam", "amsgrad": True, "weight_decay": 0.01},
    {"type": "AdamW", "amsgrad": True},
    "RMSprop",
    {"type": "RMSprop", "momentum": 0.5, "centered": True, "weight_decay": 0.1},
    {"type": "Adagrad", "lr_decay": 0.01, "weight_decay": 0.1},
]


def linear(width: int) -> dict[str, Any]:
    return {"type": "Linear", "out_features": width}


CLASSIFIER = [linear(16), "Tanh", linear(16), "Tanh", linear(2)]


def allowed_types(union: Any) -> list[str]:
    """The ``type`` names of the pydantic models in one of spec.py's discriminated unions."""
    members = typing.get_args(typing.get_args(union)[0])  # Annotated[Union[...], Field] -> the models
    return [typing.get_args(m.model_fields["type"].annotation)[0] for m in members]


def moons(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_moons(n, noise=0.1, seed=0)
    return x.astype(np.float32), y


def wave(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_wave(n, seed=0)
    return x.astype(np.float32), y


def plan_for(spec: S.TrainSpec, x: np.ndarray, y: np.ndarray) -> S.TrainingPlan:
    """Plan against the schema of a table with columns x0..xn and "label"."""
    names = [f"x{j}" for j in range(x.shape[1])]
    table = Table([*names, "label"], [*(x[:, j] for j in range(x.shape[1])), y])
    return S.plan_training(spec, table.schema(), LIMITS)


TRAIN_KWARGS = (
    "on_epoch",
    "should_stop",
    "check_every_s",
    "resume",
    "on_checkpoint",
    "checkpoint_every_s",
    "should_preempt",
    "init",
    "threads",
)


def fit(x: np.ndarray, y: np.ndarray, **fields: Any) -> tuple[S.TrainSpec, S.TrainingPlan, loop.TrainedModel]:
    """Parse a spec (CPU, Adam, a two-class classifier unless ``fields`` say otherwise), plan it, train it."""
    base: dict[str, Any] = {
        "model": CLASSIFIER,
        "loss": "CrossEntropyLoss",
        "optimizer": {"type": "Adam", "lr": 0.05},
        "epochs": 30,
        "batch_size": 32,
        "device": "cpu",
    }
    train_kwargs = {k: fields.pop(k) for k in TRAIN_KWARGS if k in fields}
    spec = S.TrainSpec.model_validate({**base, **fields})
    plan = plan_for(spec, x, y)
    return spec, plan, loop.train(spec, plan, x, y, **train_kwargs)


def predict_raw(module: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return module(torch.from_numpy(x))


def save_and_load(tmp_path, spec: S.TrainSpec, plan: S.TrainingPlan, result: loop.TrainedModel) -> Predictor:
    store = LocalStore(tmp_path / "store")
    store.ensure()
    model_id = new_id()
    sha256, _ = store.save_weights(model_id, result.module.state_dict(), {"trainserve_model_id": model_id})
    record = SimpleNamespace(
        id=model_id,
        weights_sha256=sha256,
        spec=spec.model_dump(mode="json"),
        features=plan.features,
        targets=plan.targets,
        task=plan.task,
        classes=plan.classes,
        name=None,
        version=None,
    )
    return Predictor.load(store, record)  # type: ignore[arg-type]


MoonsClassifier = tuple[np.ndarray, np.ndarray, S.TrainSpec, S.TrainingPlan, loop.TrainedModel]


def train_moons_classifier() -> MoonsClassifier:
    """The two-moons classifier with string labels: its rows, labels, spec, plan and trained model."""
    x, y = moons()
    labels = np.where(y == 1, "inner", "outer")
    spec, plan, result = fit(x, labels)
    return x, labels, spec, plan, result


# -- checkpoints ----------------------------------------------------------------------------------


def through_files(checkpoint: loop.Checkpoint, tmp_path) -> loop.Checkpoint:
    """Store a checkpoint the way the jobs module does (safetensors + strict JSON) and load it back."""
    path = tmp_path / f"checkpoint-{new_id()}.safetensors"
    save_file(checkpoint.tensors, path)
    meta = json.loads(json.dumps(checkpoint.meta, allow_nan=False))
    return loop.Checkpoint(checkpoint.epoch, load_file(path), meta)


def assert_same_run(a: loop.TrainedModel, b: loop.TrainedModel) -> None:
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert a.history == b.history
    assert a.metrics == b.metrics
