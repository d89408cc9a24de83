"""Reproduce the deep-learning guide's four experiments over HTTP against a running trainserve.

Each experiment builds its toy data with ``trainserve.examples``, uploads it as CSV, submits the
guide's own hyper-parameters (SGD lr 0.001, batch size 1, the guide's epochs, raw unscaled
inputs: ``"standardize": false``), waits for the job, and prints one line per experiment;
then it asks ``/predict`` about a few points of each model.

    ============  ==========================================  =====================  ======
    name          model                                       loss                   epochs
    ============  ==========================================  =====================  ======
    line          Linear(1,1)                                 MSELoss                20
    tanh          Linear(1,10), Tanh, Linear(10,1)            MSELoss                200
    moons-linear  Linear(2,2)                                 CrossEntropyLoss       50
    moons-mlp     Linear(2,30), Tanh, Linear(30,30), Tanh,    CrossEntropyLoss       300
                  Linear(30,2)
    ============  ==========================================  =====================  ======

The regressions run on y = x + 2 sin x + noise with x in [0, 20] (``make_wave``), shuffled
every epoch as the guide's ``DataLoader(..., shuffle=True)`` does; the classifiers on
``make_moons(200, noise=0.05)`` in a fixed order, as the guide's ``DataLoader(dataset)`` does.

Run it against a server (start one with ``python -m trainserve serve``):

    .venv/bin/python scripts/guide_experiments.py --url http://127.0.0.1:8000
    .venv/bin/python scripts/guide_experiments.py --only moons-mlp
    .venv/bin/python scripts/guide_experiments.py --epochs-scale 0.1     # a quick smoke test

The API key comes from ``--api-key`` or ``TRAINSERVE_API_KEY``. The exit status is 0 when
every job succeeded, 1 when any failed (a diverging run fails with a non-finite loss), and
2 when the server could not be reached or refused a request.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import numpy as np

from trainserve.api.schemas import JobDetail, Model
from trainserve.client import ApiError, TrainserveClient
from trainserve.examples import MOONS_MLP_LAYERS, make_moons, make_wave, to_csv

Kind = Literal["regression", "classification"]

GUIDE_LR = 0.001
GUIDE_BATCH_SIZE = 1
SEED = 0
# Below this R² a regression is reported as not having learnt the trend.
MIN_R2 = 0.5


def _linear(out_features: int) -> dict[str, Any]:
    return {"type": "Linear", "out_features": out_features}


def _wave() -> tuple[np.ndarray, np.ndarray]:
    return make_wave(300, seed=SEED)


def _moons() -> tuple[np.ndarray, np.ndarray]:
    return make_moons(200, noise=0.05, seed=SEED)


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    kind: Kind
    data: Callable[[], tuple[np.ndarray, np.ndarray]]
    features: list[str]
    layers: list[Any]
    loss: str
    epochs: int
    shuffle: bool
    # Points to ask /predict about, each with what the guide's data says the answer is.
    probes: list[tuple[list[float], float | int]]

    def spec(self, dataset_id: str, epochs: int, device: str) -> dict[str, Any]:
        return {
            "dataset_id": dataset_id,
            "target": "y",
            "model": self.layers,
            "loss": self.loss,
            "optimizer": {"type": "SGD", "lr": GUIDE_LR},
            "epochs": epochs,
            "batch_size": GUIDE_BATCH_SIZE,
            "shuffle": self.shuffle,
            "seed": SEED,
            "standardize": False,
            "device": device,
        }


def _wave_probes() -> list[tuple[list[float], float | int]]:
    # The noise-free curve the data scatters around.
    return [([x], round(x + 2 * math.sin(x), 3)) for x in (0.0, 5.0, 10.0, 15.0, 20.0)]


# Points on the two noise-free half circles: the outer moon is class 0, the inner one class 1.
_MOON_PROBES: list[tuple[list[float], float | int]] = [
    ([-1.0, 0.0], 0),
    ([0.0, 1.0], 0),
    ([0.0, 0.5], 1),
    ([1.0, -0.5], 1),
    ([2.0, 0.5], 1),
]

EXPERIMENTS: list[Experiment] = [
    Experiment(
        name="line",
        description="Linear(1,1), MSELoss",
        kind="regression",
        data=_wave,
        features=["x"],
        layers=[_linear(1)],
        loss="MSELoss",
        epochs=20,
        shuffle=True,
        probes=_wave_probes(),
    ),
    Experiment(
        name="tanh",
        description="Linear(1,10), Tanh, Linear(10,1), MSELoss",
        kind="regression",
        data=_wave,
        features=["x"],
        layers=[_linear(10), "Tanh", _linear(1)],
        loss="MSELoss",
        epochs=200,
        shuffle=True,
        probes=_wave_probes(),
    ),
    Experiment(
        name="moons-linear",
        description="Linear(2,2), CrossEntropyLoss",
        kind="classification",
        data=_moons,
        features=["x0", "x1"],
        layers=[_linear(2)],
        loss="CrossEntropyLoss",
        epochs=50,
        shuffle=False,
        probes=_MOON_PROBES,
    ),
    Experiment(
        name="moons-mlp",
        description="2x30 Tanh MLP, CrossEntropyLoss",
        kind="classification",
        data=_moons,
        features=["x0", "x1"],
        layers=MOONS_MLP_LAYERS,
        loss="CrossEntropyLoss",
        epochs=300,
        shuffle=False,
        probes=_MOON_PROBES,
    ),
]
BY_NAME = {e.name: e for e in EXPERIMENTS}


@dataclass
class Outcome:
    experiment: Experiment
    epochs: int
    job: JobDetail
    model: Model | None
    wall_seconds: float
    notes: list[str]

    @property
    def ok(self) -> bool:
        return self.job.status == "succeeded" and self.model is not None


def run_experiment(client: TrainserveClient, exp: Experiment, epochs: int, device: str, timeout: float) -> Outcome:
    x, y = exp.data()
    csv = to_csv(x, y, feature_names=exp.features, target="y").encode()
    dataset = client.upload_dataset(csv, filename=f"guide-{exp.name}.csv")
    started = time.perf_counter()
    job = client.train(exp.spec(dataset.id, epochs, device))
    detail = client.wait(job.id, timeout=timeout, poll=0.1)
    wall = time.perf_counter() - started
    model = client.get_model(detail.model_id) if detail.status == "succeeded" and detail.model_id else None
    return Outcome(exp, epochs, detail, model, wall, _judge(exp, detail, model))


def _judge(exp: Experiment, job: JobDetail, model: Model | None) -> list[str]:
    """Say plainly when the guide's own setting did not work, instead of hiding it."""
    settings = f"the guide's setting (SGD lr {GUIDE_LR}, batch {GUIDE_BATCH_SIZE}, raw inputs)"
    if job.status != "succeeded":
        reason = job.error or job.status
        if "loss became" in reason:
            return [f"{exp.name}: DIVERGED under {settings}: {reason}"]
        return [f"{exp.name}: job {job.status}: {reason}"]
    if model is None:
        return [f"{exp.name}: the job succeeded but has no model"]
    if exp.kind == "regression":
        r2 = model.metrics.get("train_r2", float("nan"))
        if not math.isfinite(r2) or r2 < MIN_R2:
            return [f"{exp.name}: did not converge under {settings}: train R² {r2:.3f}"]
        return [f"{exp.name}: converged under {settings}, x in [0, 20]: train R² {r2:.3f}"]
    return []


# -- printing --------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def print_table(outcomes: Sequence[Outcome]) -> None:
    header = (
        f"{'experiment':<13} {'epochs':>6} {'status':<9} {'epoch loss':>10} {'final loss':>10} "
        f"{'metric':<14} {'train s':>8} {'wall s':>7}  model id"
    )
    print(header)
    print("-" * len(header))
    for o in outcomes:
        metrics = o.model.metrics if o.model else {}
        if o.experiment.kind == "classification":
            metric = f"acc {_fmt(metrics.get('train_accuracy'), 3)}"
        else:
            metric = f"R² {_fmt(metrics.get('train_r2'), 3)}"
        print(
            f"{o.experiment.name:<13} {o.epochs:>6} {o.job.status:<9} {_fmt(o.job.train_loss):>10} "
            f"{_fmt(metrics.get('train_loss')):>10} {metric:<14} "
            f"{_fmt(o.model.train_seconds if o.model else None, 2):>8} {o.wall_seconds:>7.2f}  "
            f"{o.model.id if o.model else '-'}"
        )
    print(
        "epoch loss: mean loss over the last epoch (the guide's running_loss); final loss: the trained "
        "model over the whole training set; train s: the engine's time; wall s: POST /train to job end."
    )


def print_predictions(client: TrainserveClient, outcome: Outcome) -> None:
    assert outcome.model is not None
    exp = outcome.experiment
    inputs = [point for point, _ in exp.probes]
    response = client.predict(outcome.model.id, inputs)
    print(f"\n{exp.name} ({exp.description}) -> /predict on model {outcome.model.id}")
    for i, ((point, expected), predicted) in enumerate(zip(exp.probes, response.predictions, strict=True)):
        where = ", ".join(f"{name}={v:g}" for name, v in zip(exp.features, point, strict=True))
        if exp.kind == "regression":
            print(f"  {where:<18} predicted {float(predicted):8.3f}   curve x + 2 sin x = {expected:8.3f}")
        else:
            probs = response.probabilities[i] if response.probabilities else []
            shown = " ".join(f"{p:.3f}" for p in probs)
            mark = "ok" if predicted == expected else "WRONG"
            print(f"  {where:<18} predicted {predicted}   expected {expected} {f'({mark})':<7}   p = [{shown}]")


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the trainserve base URL")
    parser.add_argument(
        "--api-key", default=os.environ.get("TRAINSERVE_API_KEY"), help="bearer key (default: $TRAINSERVE_API_KEY)"
    )
    parser.add_argument("--only", choices=list(BY_NAME), help="run this experiment alone")
    parser.add_argument(
        "--epochs-scale", type=float, default=1.0, help="multiply the guide's epochs by this (smoke tests: 0.05)"
    )
    parser.add_argument("--device", default="auto", help="the spec's device: auto (the server's choice), cpu, cuda")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for each job")
    args = parser.parse_args(argv)
    if not (args.epochs_scale > 0 and math.isfinite(args.epochs_scale)):
        parser.error("--epochs-scale must be a positive number")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [BY_NAME[args.only]] if args.only else EXPERIMENTS
    outcomes: list[Outcome] = []
    try:
        with TrainserveClient(args.url, api_key=args.api_key) as client:
            for exp in chosen:
                epochs = max(1, round(exp.epochs * args.epochs_scale))
                print(f"training {exp.name}: {exp.description}, {epochs} epochs ...", flush=True)
                outcomes.append(run_experiment(client, exp, epochs, args.device, args.timeout))
            print()
            print_table(outcomes)
            notes = [note for o in outcomes for note in o.notes]
            if args.epochs_scale != 1.0:
                notes.append(f"epochs scaled by {args.epochs_scale:g}: these are not the guide's full runs")
            for note in notes:
                print(f"NOTE: {note}")
            for outcome in outcomes:
                if outcome.ok:
                    print_predictions(client, outcome)
    except (ApiError, httpx.HTTPError, TimeoutError) as exc:
        print(f"error talking to {args.url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    failed = [o.experiment.name for o in outcomes if not o.ok]
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
