"""Warm starts: a spec that begins from a trained model's weights (``init_from``), optionally
keeping some layers fixed (``freeze``). What may be copied is decided here, from the specs
alone; the loop (training/loop.py) does the copying and the freezing.
"""

from __future__ import annotations

from typing import Any

from trainserve.errors import InvalidInput
from trainserve.training import spec as S

Shapes = dict[str, tuple[int, ...]]


def _fail(msg: str, loc: list[str | int]) -> InvalidInput:
    return InvalidInput(msg, errors=[{"loc": loc, "msg": msg}])


def parameter_shapes(layers: list[Any], in_features: int) -> list[Shapes]:
    """Each layer's parameters and their shapes, as ``nn.Sequential`` will hold them."""
    shapes: list[Shapes] = []
    width = in_features
    for layer in layers:
        if isinstance(layer, S.Linear):
            own: Shapes = {"weight": (layer.out_features, width)}
            if layer.bias:
                own["bias"] = (layer.out_features,)
            width = layer.out_features
        elif (isinstance(layer, S.BatchNorm1d) and layer.affine) or (
            isinstance(layer, S.LayerNorm) and layer.elementwise_affine
        ):
            own = {"weight": (width,), "bias": (width,)}
        else:
            own = {}
        shapes.append(own)
    return shapes


def check_freeze(spec: S.TrainSpec, in_features: int) -> None:
    """``freeze`` names layers that have parameters, not all of them, and goes with ``init_from``."""
    if not spec.freeze:
        return
    if spec.init_from is None:
        raise _fail("freeze keeps layers of the model in init_from fixed: set init_from too", ["freeze"])
    shapes = parameter_shapes(spec.model, in_features)
    for k, index in enumerate(spec.freeze):
        if index >= len(spec.model):
            raise _fail(f"freeze names layer {index}, the model has {len(spec.model)} layers (0-based)", ["freeze", k])
        if not shapes[index]:
            raise _fail(f"layer {index} ({spec.model[index].type}) has no parameters to freeze", ["freeze", k])
    trainable = {i for i, own in enumerate(shapes) if own} - set(spec.freeze)
    if not trainable:
        raise _fail("freeze names every layer with parameters: nothing would train", ["freeze"])


def check_layers(child: list[Any], parent: list[Any], in_features: int) -> None:
    """The spec's layers must be the parent's, parameter for parameter, to take its weights."""
    mine, theirs = parameter_shapes(child, in_features), parameter_shapes(parent, in_features)
    if len(child) != len(parent):
        raise _fail(
            f"the model has {len(child)} layers, the model in init_from has {len(parent)}: a warm start "
            "takes the same layers",
            ["model"],
        )
    for i, (a, b, layer, other) in enumerate(zip(mine, theirs, child, parent, strict=True)):
        if layer.type != other.type or a != b:
            parent_side = f"{other.type} {_shape_text(b)}"
            raise _fail(
                f"layer {i} is {layer.type} {_shape_text(a)}, in the model in init_from it is {parent_side}",
                ["model", i],
            )


def _shape_text(shapes: Shapes) -> str:
    return ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items()) or "without parameters"
