"""Benchmark: what checkpointing costs a training job, and that resuming loses nothing.

One process, one data set (``make_moons(200, noise=0.05, seed=0)``), the guide's 2x30 Tanh
MLP with SGD at batch size 1 (many small steps: the worst case for a per-step hook). Runs,
in turns so that machine noise hits them alike:

    plain         ``loop.train`` with no checkpoint hook (the baseline)
    checkpointed  the same, saving a checkpoint with ``Store.save_checkpoint`` (safetensors,
                  fsync, atomic rename) every ``--every`` seconds, as a worker does
    resumed       preempted half-way (a checkpoint, then ``TrainingPreempted``), reloaded
                  from the store and resumed: its final weights must equal plain's bit for bit

    .venv/bin/python bench/checkpoints.py --repeat 3 --every 0.5

Prints the best time of each, the overhead ratio against plain, the checkpoint size and the
mean time to save one. Exit status 1 when the resumed weights differ from an uninterrupted
run's, or when checkpointing every ``--every`` seconds costs more than ``--max-overhead``
(a ratio of times measured in the same run, never an absolute time).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainserve.datasets.tables import ColumnInfo, TableSchema  # noqa: E402
from trainserve.examples import MOONS_MLP_LAYERS, make_moons  # noqa: E402
from trainserve.storage.base import new_id  # noqa: E402
from trainserve.storage.local import LocalStore  # noqa: E402
from trainserve.training import loop  # noqa: E402
from trainserve.training.spec import Limits, TrainingPlan, TrainSpec, plan_training  # noqa: E402


def setup(epochs: int) -> tuple[TrainSpec, TrainingPlan, np.ndarray, np.ndarray]:
    x, y = make_moons(200, noise=0.05, seed=0)
    spec = TrainSpec.model_validate(
        {
            "model": MOONS_MLP_LAYERS,
            "loss": "CrossEntropyLoss",
            "optimizer": {"type": "SGD", "lr": 0.001},
            "epochs": epochs,
            "batch_size": 1,
            "seed": 0,
            "device": "cpu",
            "loop": "eager",
        }
    )
    schema = TableSchema(
        len(x),
        [ColumnInfo("x0", "float64"), ColumnInfo("x1", "float64"), ColumnInfo("y", "int64", [0, 1])],
    )
    plan = plan_training(spec, schema, Limits(max_epochs=10**9, max_parameters=10**9, max_layer_width=10**6))
    return spec, plan, x.astype(np.float32), y


def weights_of(result: loop.TrainedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in result.module.state_dict().items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--every", type=float, default=0.5, help="seconds between checkpoints")
    parser.add_argument("--max-overhead", type=float, default=1.10, help="checkpointed/plain time ratio allowed")
    args = parser.parse_args()

    spec, plan, x, y = setup(args.epochs)
    store = LocalStore(Path(tempfile.mkdtemp(prefix="trainserve-bench-")))
    store.ensure()
    job_id = new_id()
    plain_times: list[float] = []
    checkpointed_times: list[float] = []
    save_times: list[float] = []

    def save(checkpoint: loop.Checkpoint) -> None:
        started = time.perf_counter()
        store.save_checkpoint(job_id, checkpoint.tensors, {"epoch": checkpoint.epoch, "engine": checkpoint.meta})
        save_times.append(time.perf_counter() - started)

    reference: dict[str, torch.Tensor] = {}
    for _ in range(args.repeat):
        started = time.perf_counter()
        reference = weights_of(loop.train(spec, plan, x, y))
        plain_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        loop.train(spec, plan, x, y, on_checkpoint=save, checkpoint_every_s=args.every)
        checkpointed_times.append(time.perf_counter() - started)

    # Preempt half-way through the plain run's time, then resume from what the store holds.
    half = min(plain_times) / 2
    started = time.monotonic()
    try:
        loop.train(
            spec,
            plan,
            x,
            y,
            on_checkpoint=save,
            should_preempt=lambda: time.monotonic() - started > half,
            check_every_s=0.05,
        )
        raise SystemExit("the run ended before it could be preempted; use more --epochs")
    except loop.TrainingPreempted as preempted:
        preempted_at = preempted.checkpoint.epoch
    stored = store.load_checkpoint(job_id)
    assert stored is not None
    tensors, meta = stored
    resumed = weights_of(loop.train(spec, plan, x, y, resume=loop.Checkpoint(meta["epoch"], tensors, meta["engine"])))
    identical = resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)

    plain, checkpointed = min(plain_times), min(checkpointed_times)
    ratio = checkpointed / plain
    size = store.checkpoint_path(job_id).stat().st_size
    steps = args.epochs * len(x)
    print(f"{steps} SGD steps (batch 1), {args.repeat} runs each, best time; checkpoint every {args.every} s")
    spread = f"{min(checkpointed_times):.2f}-{max(checkpointed_times):.2f} s"
    mean_save_ms = 1000 * sum(save_times) / len(save_times)
    print(f"  plain          {plain:7.2f} s")
    print(f"  checkpointed   {checkpointed:7.2f} s   {ratio:.3f}x plain (spread {spread})")
    print(f"  checkpoint     {size / 1024:.1f} KiB, {mean_save_ms:.1f} ms a save on average ({len(save_times)} saves)")
    verdict = "identical" if identical else "DIFFERENT"
    print(f"  resumed        preempted after epoch {preempted_at}, then resumed: weights {verdict} to plain's")
    failed = False
    if not identical:
        print("FAIL: the resumed run's weights differ from an uninterrupted run's")
        failed = True
    if ratio > args.max_overhead:
        print(f"FAIL: checkpointing costs {ratio:.3f}x, more than {args.max_overhead}x")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
