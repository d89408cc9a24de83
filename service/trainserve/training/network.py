"""The network a spec describes: the user's ``nn.Sequential`` behind an input scaler.

Used by the worker that trains it and by every process that serves it; torch only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainserve.training import spec as S

if TYPE_CHECKING:  # features.prepare imports the loop, which imports this module
    from trainserve.training.features import FeaturePlan

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
    """The user's ``nn.Sequential`` behind an input scaler: raw feature rows in, outputs out.

    A model trained on a table with blanks or categories also has an ``encoder`` in front
    (``FeatureEncoder`` below): its input is then the raw layout and
    ``in_features`` is the encoded width. Training runs on the table encoded once, so the
    encoder is attached after training (``attach_encoder``); its buffers are saved with
    the weights."""

    encoder: nn.Module | None
    embeddings: Embeddings | None

    def __init__(
        self,
        layers: list[Any],
        in_features: int,
        encoder: nn.Module | None = None,
        embeddings: list[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.scaler = Standardize(in_features)
        self.net = build_sequential(layers, in_features)
        # After the net: its initial weights draw the same random numbers with or without embeddings.
        self.embeddings = Embeddings(embeddings) if embeddings else None

    def attach_encoder(self, encoder: nn.Module) -> None:
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder is not None:
            x = self.encoder(x)
        if self.embeddings is not None:
            x = self.embeddings(x)
        out: torch.Tensor = self.net(self.scaler(x))
        return out


class Embeddings(nn.Module):
    """Trained embeddings of category columns: the last ``len(tables)`` input columns hold
    level indices (the encoded layout of training.features), each replaced by its row of an
    ``nn.Embedding``; the columns before them pass through."""

    def __init__(self, tables: list[tuple[int, int]]) -> None:
        super().__init__()
        built = [nn.Embedding(rows, dim) for rows, dim in tables]
        with torch.no_grad():
            for table, (rows, _) in zip(built, tables, strict=True):
                # The unknown row (second to last) starts at zero and no training row ever picks
                # it: a level never seen answers as "none of the levels", as a one-hot does.
                table.weight[rows - 2].zero_()
        self.tables = nn.ModuleList(built)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x.shape[1] - len(self.tables)
        index = x[:, first:].long()
        vectors = [table(index[:, k]) for k, table in enumerate(self.tables)]
        return torch.cat([x[:, :first], *vectors], dim=1)


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


def outputs_to_probabilities(outputs: torch.Tensor, task: S.Task) -> torch.Tensor:
    if task == "binary":
        p = torch.sigmoid(outputs[:, 0])
        return torch.stack([1 - p, p], dim=1)
    # Softmax written out: torch.softmax over a narrow last dimension is slow (two classes,
    # 65,536 rows: 3.0 ms on one thread against 0.6 ms for these five operations).
    exp = (outputs - outputs.amax(dim=1, keepdim=True)).exp_()
    return exp.div_(exp.sum(dim=1, keepdim=True))


# -- the feature encoder (training/features.py describes both layouts) ---------------------

# Marks a one-hot slot that stands for "blank": NaN never equals anything, so it gets its own code.
_BLANK_CODE = -2.0


class FeatureEncoder(nn.Module):
    """Raw layout -> encoded layout (see training/features.py): fill, indicate, one-hot."""

    number_source: torch.Tensor
    number_fill: torch.Tensor
    indicator_source: torch.Tensor
    onehot_source: torch.Tensor
    onehot_code: torch.Tensor
    embed_source: torch.Tensor
    embed_unknown: torch.Tensor
    embed_blank: torch.Tensor

    def __init__(self, plan: FeaturePlan) -> None:
        super().__init__()
        numbers = [(j, c) for j, c in enumerate(plan.columns) if c.kind != "category"]
        sources, codes = [], []
        embedded = [(j, c) for j, c in enumerate(plan.columns) if c.embedded]
        for j, c in enumerate(plan.columns):
            if c.kind == "category" and not c.embedded:
                sources += [j] * c.width
                codes += [float(k) for k in range(len(c.levels))] + ([_BLANK_CODE] if c.blank_level else [])
        # An embedded category's index: its level, else its table's unknown row (levels), or its
        # blank row (levels + 1) when training had blanks.
        self.register_buffer("embed_source", torch.tensor([j for j, _ in embedded], dtype=torch.long))
        self.register_buffer(
            "embed_unknown", torch.tensor([float(len(c.levels)) for _, c in embedded], dtype=torch.float32)
        )
        self.register_buffer(
            "embed_blank",
            torch.tensor([float(len(c.levels) + int(c.blank_level)) for _, c in embedded], dtype=torch.float32),
        )
        self.register_buffer("number_source", torch.tensor([j for j, _ in numbers], dtype=torch.long))
        self.register_buffer(
            "number_fill", torch.tensor([float(c.fill_value or 0.0) for _, c in numbers], dtype=torch.float32)
        )
        self.register_buffer("indicator_source", torch.tensor([j for j, c in numbers if c.indicator], dtype=torch.long))
        self.register_buffer("onehot_source", torch.tensor(sources, dtype=torch.long))
        self.register_buffer("onehot_code", torch.tensor(codes, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        numbers = x.index_select(1, self.number_source)
        filled = torch.where(torch.isnan(numbers), self.number_fill, numbers)
        indicators = torch.isnan(x.index_select(1, self.indicator_source)).to(x.dtype)
        cells = x.index_select(1, self.onehot_source)
        hot = (cells == self.onehot_code) | (torch.isnan(cells) & (self.onehot_code == _BLANK_CODE))
        codes = x.index_select(1, self.embed_source)
        outside = (codes < 0) | (codes >= self.embed_unknown)  # NaN compares False: kept for the next line
        index = torch.where(torch.isnan(codes), self.embed_blank, torch.where(outside, self.embed_unknown, codes))
        return torch.cat([filled, indicators, hot.to(x.dtype), index], dim=1)
