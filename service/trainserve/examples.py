"""The guide's toy datasets, made without scikit-learn: used by scripts, benchmarks and tests."""

from __future__ import annotations

from typing import Any

import numpy as np

# The guide's 2x30 Tanh make_moons classifier, as the spec's "model" list.
MOONS_MLP_LAYERS: list[dict[str, Any]] = [
    {"type": "Linear", "out_features": 30},
    {"type": "Tanh"},
    {"type": "Linear", "out_features": 30},
    {"type": "Tanh"},
    {"type": "Linear", "out_features": 2},
]


def make_moons(n_samples: int = 200, noise: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaving half circles, as ``sklearn.datasets.make_moons`` draws them."""
    rng = np.random.default_rng(seed)
    n_out = n_samples // 2
    n_in = n_samples - n_out
    outer = np.linspace(0, np.pi, n_out)
    inner = np.linspace(0, np.pi, n_in)
    x = np.vstack(
        [
            np.column_stack([np.cos(outer), np.sin(outer)]),
            np.column_stack([1 - np.cos(inner), 1 - np.sin(inner) - 0.5]),
        ]
    )
    y = np.concatenate([np.zeros(n_out, dtype=np.int64), np.ones(n_in, dtype=np.int64)])
    x += rng.normal(scale=noise, size=x.shape)
    order = rng.permutation(n_samples)
    return x[order], y[order]


def make_wave(n_samples: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The guide's regression toy: y = x + 2 sin(x) + noise on x in [0, 20]."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 20, num=n_samples)
    y = x + np.sin(x) * 2 + rng.normal(size=x.shape)
    return x.reshape(-1, 1), y


def to_csv(x: np.ndarray, y: np.ndarray, feature_names: list[str] | None = None, target: str = "label") -> str:
    names = feature_names or [f"x{j}" for j in range(x.shape[1])]
    lines = [",".join([*names, target])]
    lines += [",".join([*(repr(float(v)) for v in row), str(label)]) for row, label in zip(x, y, strict=False)]
    return "\n".join(lines) + "\n"


def guide_moons_spec() -> dict[str, Any]:
    """The guide's 2x30 Tanh make_moons classifier as a spec: its own SGD lr 0.001, batch
    size 1, 300 epochs, on raw (unscaled) inputs. What the dashboard's form starts with, so
    its target is the class column of the shipped ``examples/moons.csv``: ``y``."""
    return {
        "target": "y",
        "model": MOONS_MLP_LAYERS,
        "loss": "CrossEntropyLoss",
        "optimizer": {"type": "SGD", "lr": 0.001},
        "epochs": 300,
        "batch_size": 1,
        "standardize": False,
        "seed": 0,
    }
