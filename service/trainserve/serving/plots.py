"""PNG plots like the guide's: loss curves, decision regions, data with the fitted curve.

Headless: figures are drawn with matplotlib's Agg canvas directly (no pyplot, no
display, no global figure state). matplotlib is not thread-safe, and the API renders in
its thread pool, so one lock serialises drawing; a plot takes a fraction of a second.
Knows numpy, torch and matplotlib (each imported where used: the API loads them after it
answers); no HTTP, no SQL.
"""

from __future__ import annotations

import functools
import io
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec

import numpy as np

from trainserve.serving.predictor import Predictor

if TYPE_CHECKING:  # matplotlib is imported when the first plot is drawn: 0.5 s off every start
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100
DEFAULT_SIZE = (800, 600)
MIN_SIDE, MAX_SIDE = 200, 2400
# The guide's visualize2DSoftmax used a 20x20 grid; this is smooth at any size allowed.
GRID_STEPS = 300
# Scatter at most this many data points: beyond it they hide the regions and cost time.
MAX_POINTS = 5_000
_MARKERS = "os^Dv<>pP*Xh"
_draw_lock = threading.Lock()


P = ParamSpec("P")


def _one_at_a_time(draw: Callable[P, bytes]) -> Callable[P, bytes]:
    @functools.wraps(draw)
    def locked(*args: P.args, **kwargs: P.kwargs) -> bytes:
        with _draw_lock:
            return draw(*args, **kwargs)

    return locked


def _new_figure(size: tuple[int, int]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = size
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


@_one_at_a_time
def loss_curve(history: list[list[Any]], *, title: str, size: tuple[int, int] = DEFAULT_SIZE) -> bytes:
    """Train (and validation) loss per epoch, from a job's ``[epoch, train, val]`` rows."""
    epochs = [row[0] for row in history]
    train = np.array([row[1] for row in history], dtype=float)
    val = np.array([np.nan if row[2] is None else row[2] for row in history], dtype=float)
    figure = _new_figure(size)
    ax = figure.add_subplot()
    marker = "o" if len(epochs) <= 30 else None
    ax.plot(epochs, train, color="tab:blue", marker=marker, label="train loss")
    if np.isfinite(val).any():
        ax.plot(epochs, val, color="tab:orange", marker=marker, label="validation loss")
    losses = np.concatenate([train, val[np.isfinite(val)]])
    # Losses that fall over decades read better on a log scale.
    if (losses > 0).all() and losses.max() / losses.min() > 100:
        ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(figure)


def _probabilities(predictor: Predictor, x: np.ndarray) -> np.ndarray:
    import torch

    from trainserve.training.network import outputs_to_probabilities

    with torch.inference_mode():
        outputs = predictor.module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return outputs_to_probabilities(outputs, predictor.task).numpy()  # type: ignore[arg-type]


def _outputs(predictor: Predictor, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        outputs: np.ndarray = predictor.module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
    return outputs


def _sample(n_rows: int, seed: int = 0) -> np.ndarray:
    if n_rows <= MAX_POINTS:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, MAX_POINTS, replace=False))


def _scatter_classes(ax: Axes, x: np.ndarray, labels: np.ndarray, classes: list[Any], colors: list[Any]) -> None:
    for k, label in enumerate(classes):
        rows = labels == label
        if rows.any():
            ax.scatter(
                x[rows, 0],
                x[rows, 1],
                s=22,
                marker=_MARKERS[k % len(_MARKERS)],
                color=colors[k],
                edgecolors="black",
                linewidths=0.5,
                label=str(label),
            )


@_one_at_a_time
def decision_regions(
    predictor: Predictor, x: np.ndarray, labels: np.ndarray, *, title: str, size: tuple[int, int] = DEFAULT_SIZE
) -> bytes:
    """The guide's visualize2DSoftmax: class probabilities over a grid, the data on top."""
    assert predictor.classes is not None
    classes = predictor.classes
    pad = 0.5
    (x_min, y_min), (x_max, y_max) = x.min(axis=0) - pad, x.max(axis=0) + pad
    gx, gy = np.meshgrid(np.linspace(x_min, x_max, GRID_STEPS), np.linspace(y_min, y_max, GRID_STEPS), indexing="ij")
    grid = np.column_stack([gx.ravel(), gy.ravel()])
    probabilities = _probabilities(predictor, grid)
    rows = _sample(len(x))
    figure = _new_figure(size)
    ax = figure.add_subplot()
    if len(classes) == 2:
        # As in the guide: the first class's probability, blue for it, red for the other.
        first = probabilities[:, 0].reshape(gx.shape)
        filled = ax.contourf(gx, gy, first, levels=np.linspace(0, 1, 21), cmap="RdYlBu", alpha=0.85)
        figure.colorbar(filled, ax=ax, label=f"P({classes[0]})")
        colors: list[Any] = ["#2c7bb6", "#d7191c"]
    else:
        palette = [_tab10(k) for k in range(len(classes))]
        winner = probabilities.argmax(axis=1).reshape(gx.shape)
        ax.contourf(gx, gy, winner, levels=np.arange(len(classes) + 1) - 0.5, colors=palette, alpha=0.35)
        colors = palette
    _scatter_classes(ax, x[rows], labels[rows], classes, colors)
    ax.set(xlabel=predictor.features[0], ylabel=predictor.features[1], title=title)
    ax.legend(title=predictor.targets[0], loc="best")
    return _png(figure)


def _tab10(k: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab10"](k % 10)


@_one_at_a_time
def fitted_curve(
    predictor: Predictor, x: np.ndarray, y: np.ndarray, *, title: str, size: tuple[int, int] = DEFAULT_SIZE
) -> bytes:
    """The guide's scatter of the data with the model's curve over it (one feature, one target)."""
    line_x = np.linspace(x[:, 0].min(), x[:, 0].max(), 1000).reshape(-1, 1)
    line_y = _outputs(predictor, line_x)[:, 0]
    rows = _sample(len(x))
    figure = _new_figure(size)
    ax = figure.add_subplot()
    ax.scatter(x[rows, 0], y[rows], s=12, color="black", alpha=0.6, label="data")
    ax.plot(line_x[:, 0], line_y, color="red", linewidth=2, label="model")
    ax.set(xlabel=predictor.features[0], ylabel=predictor.targets[0], title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(figure)


@_one_at_a_time
def predicted_vs_actual(
    predictor: Predictor, x: np.ndarray, y: np.ndarray, *, title: str, size: tuple[int, int] = DEFAULT_SIZE
) -> bytes:
    """Regression: predicted against actual per target, with the diagonal a perfect model
    would sit on. Classification: the confusion matrix (counts of actual x predicted)."""
    rows = _sample(len(x))
    x, y = x[rows], y[rows]
    figure = _new_figure(size)
    ax = figure.add_subplot()
    if predictor.task == "regression":
        predicted = _outputs(predictor, x)
        actual = y.reshape(len(y), -1)
        for j, target in enumerate(predictor.targets):
            ax.scatter(actual[:, j], predicted[:, j], s=12, alpha=0.6, color=_tab10(j), label=target)
        low, high = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
        ax.plot([low, high], [low, high], color="black", linestyle="--", linewidth=1, label="predicted = actual")
        ax.set(xlabel="actual", ylabel="predicted", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    else:
        assert predictor.classes is not None
        classes = predictor.classes
        predicted_index = _probabilities(predictor, x).argmax(axis=1)
        actual_index = np.searchsorted(np.asarray(classes), y.reshape(-1))
        counts = np.zeros((len(classes), len(classes)), dtype=np.int64)
        np.add.at(counts, (actual_index, predicted_index), 1)
        _draw_confusion(figure, ax, counts, classes, title)
    return _png(figure)


def _draw_confusion(figure: Figure, ax: Axes, counts: np.ndarray, classes: list[Any], title: str) -> None:
    image = ax.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=ax, label="rows")
    ticks = np.arange(len(classes))
    names = [str(c) for c in classes]
    ax.set_xticks(ticks, names, rotation=45 if len(classes) > 6 else 0)
    ax.set_yticks(ticks, names)
    if len(classes) <= 20:
        for (i, j), count in np.ndenumerate(counts):
            shade = "white" if count > counts.max() / 2 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=shade)
    ax.set(xlabel="predicted", ylabel="actual", title=title)


@_one_at_a_time
def confusion_matrix(
    counts: list[list[int]], classes: list[Any], *, title: str, size: tuple[int, int] = DEFAULT_SIZE
) -> bytes:
    """A stored confusion matrix (``[actual][predicted]`` counts, training.metrics) as a heat map."""
    figure = _new_figure(size)
    _draw_confusion(figure, figure.add_subplot(), np.asarray(counts, dtype=np.int64), classes, title)
    return _png(figure)


def model_plot(
    predictor: Predictor, x: np.ndarray, y: np.ndarray, *, title: str, size: tuple[int, int] = DEFAULT_SIZE
) -> tuple[str, bytes]:
    """The plot that fits the model, and its kind: decision regions for a classifier on two
    features, data and fitted curve for a regressor on one feature, predicted against
    actual otherwise (a confusion matrix for classifiers)."""
    # Decision regions need two numeric axes: a model with preprocessing may have categories.
    if predictor.task != "regression" and len(predictor.features) == 2 and predictor.preprocessing is None:
        return "decision-regions", decision_regions(predictor, x, y, title=title, size=size)
    if (
        predictor.task == "regression"
        and len(predictor.features) == 1
        and len(predictor.targets) == 1
        and predictor.preprocessing is None
    ):
        return "fitted-curve", fitted_curve(predictor, x, y, title=title, size=size)
    kind = "predicted-vs-actual" if predictor.task == "regression" else "confusion-matrix"
    return kind, predicted_vs_actual(predictor, x, y, title=title, size=size)


# -- evaluation plots (from the curves an evaluation stored) ------------------------------------

EVALUATION_PLOTS = ("confusion", "roc", "calibration", "residuals")


@_one_at_a_time
def evaluation_plot(kind: str, task: str, curves: dict[str, Any], *, title: str, size: tuple[int, int]) -> bytes:
    """One of EVALUATION_PLOTS; ValueError if the evaluation's task has no such plot."""
    classifier = task != "regression"
    if (kind == "residuals") == classifier:
        raise ValueError(f"a {task} model has no {kind} plot")
    figure = _new_figure(size)
    ax = figure.add_subplot()
    if kind == "confusion":
        matrix = np.asarray(curves["confusion_matrix"], dtype=float)
        labels = [str(c) for c in curves["classes"]]
        image = ax.imshow(matrix, cmap="Blues")
        figure.colorbar(image, ax=ax)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, f"{int(count)}", ha="center", va="center", color="black")
        ax.set(xlabel="predicted", ylabel="actual")
    elif kind == "roc":
        for label, curve in curves["roc"].items():
            ax.plot(curve["fpr"], curve["tpr"], label=f"class {label}")
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend()
    elif kind == "calibration":
        bins = curves["calibration"]
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", label="model")
        ax.set(xlabel="confidence (top class)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend()
    else:
        histogram = curves["histogram"]
        edges = np.asarray(histogram["edges"])
        ax.bar(edges[:-1], histogram["counts"], width=np.diff(edges), align="edge", color="tab:blue", alpha=0.8)
        ax.axvline(0, color="grey", linestyle="--", linewidth=1)
        ax.set(xlabel="residual (predicted - actual)", ylabel="rows")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _png(figure)
