"""Export a trained model for use outside the service: TorchScript or a ``torch.export`` program.

The exported module takes raw feature rows (float32, ``[n, features]`` in the model's
feature order: the input scaler is inside; for a model with preprocessing, the raw layout
of ``trainserve.training.features``, its imputation and one-hot encoding inside too, and
the vocabularies in ``trainserve.json`` under ``preprocessing``) and answers what ``POST /predict`` answers as
numbers: class probabilities ``[n, classes]`` for a classifier, the values
``[n, targets]`` for a regressor. ``trainserve.json`` inside the archive names the
features, targets and classes.

Exporting traces the network (seconds of CPU for ``torch.export``) and uses process-wide
compiler state, so exports run one at a time and the last few are kept in memory.
"""

from __future__ import annotations

import io
import json
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import trainserve
from trainserve.training.network import TabularNet
from trainserve.wire import ExportFormat

METADATA_FILE = "trainserve.json"
# Artifacts larger than this are rebuilt per request rather than held in memory.
_CACHE_MAX_BYTES = 32 * 1024 * 1024


class _Probabilities(nn.Module):
    def __init__(self, net: TabularNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


class _BinaryProbabilities(nn.Module):
    def __init__(self, net: TabularNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positive = torch.sigmoid(self.net(x)[:, 0])
        return torch.stack([1 - positive, positive], dim=1)


def servable(net: TabularNet, task: str) -> nn.Module:
    """The network with /predict's output: probabilities for classifiers, values for regressors."""
    wrapped: nn.Module = net
    if task == "classification":
        wrapped = _Probabilities(net)
    elif task == "binary":
        wrapped = _BinaryProbabilities(net)
    return wrapped.eval()


@dataclass(frozen=True)
class ExportedModel:
    content: bytes
    filename: str


def _export_bytes(module: nn.Module, fmt: ExportFormat, n_features: int, metadata: str) -> bytes:
    buffer = io.BytesIO()
    example = torch.zeros(2, n_features)
    if fmt == "torchscript":
        # TorchScript is deprecated in torch 2.x but still what many C++ and mobile
        # runtimes load; users asked for it by name, so the warning is not theirs to see.
        # Traced, not scripted: the network has no data-dependent control flow, and every
        # operation in it works on any batch size.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(module, example)  # type: ignore[no-untyped-call]
            torch.jit.save(traced, buffer, _extra_files={METADATA_FILE: metadata})
    else:
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(module, (example,), dynamic_shapes={"x": {0: batch}})
        torch.export.save(program, buffer, extra_files={METADATA_FILE: metadata})
    return buffer.getvalue()


class Exporter:
    """Builds export archives one at a time and keeps the last ``capacity`` of them."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], ExportedModel] = OrderedDict()

    def export(self, net: TabularNet, fmt: ExportFormat, *, model_id: str, info: dict[str, Any]) -> ExportedModel:
        key = (model_id, fmt)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
            metadata = json.dumps(
                {
                    "model_id": model_id,
                    **info,
                    "outputs": "values" if info["task"] == "regression" else "probabilities",
                    "format": fmt,
                    "torch_version": torch.__version__,
                    "code_version": f"trainserve {trainserve.__version__}",
                }
            )
            module = servable(net, info["task"])
            content = _export_bytes(module, fmt, len(info["features"]), metadata)
            suffix = "torchscript.pt" if fmt == "torchscript" else "pt2"
            exported = ExportedModel(content, f"{model_id}.{suffix}")
            if len(content) <= _CACHE_MAX_BYTES:
                self._cache[key] = exported
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
            return exported


# Process-wide: exports share torch's compiler state and are cached across requests.
EXPORTER = Exporter()
