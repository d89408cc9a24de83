"""Native or eager, by measurement (trainserve.training.crossover): the choice follows the
kept figures, they are measured once and reused, a bad file is replaced, a resumed run
keeps its loop, and the settings force either side.

Each test keeps its own native cache (compiled code and figures) in tmp_path. No test
asserts a time: the figures that decide are written by the test, or come from steppers
whose costs differ tenfold.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.small_models import assert_same_run, fit, linear, moons, through_files
from trainserve.training import crossover, loop, native

LAYERS = [linear(6), "Tanh", linear(2)]
FIELDS: dict[str, Any] = {"model": LAYERS, "epochs": 2, "batch_size": 8}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "native"
    monkeypatch.setenv("TRAINSERVE_NATIVE_CACHE_DIR", str(folder))
    monkeypatch.delenv("TRAINSERVE_NATIVE_CHOICE", raising=False)
    return folder


def figures_file() -> Path:
    return crossover.calibration_file()


def entries() -> dict[str, Any]:
    shapes: dict[str, Any] = json.loads(figures_file().read_text())["shapes"]
    return shapes


def rewrite(**changes: Any) -> None:
    """Set fields of every kept entry, as if the machine had measured those figures."""
    data = json.loads(figures_file().read_text())
    for entry in data["shapes"].values():
        entry.update(changes)
    figures_file().write_text(json.dumps(data))


def test_the_choice_follows_the_kept_figures_both_ways(cache):
    x, y = moons(64)
    _, _, first = fit(x, y, **FIELDS)
    assert len(entries()) == 1  # measured once, for this shape
    rewrite(loop="eager", native_us=900.0, eager_us=300.0, native_rows=8)
    _, _, eager = fit(x, y, **FIELDS)
    assert eager.loop == "eager"
    assert eager.notes[0] == (
        "training loop: eager PyTorch (faster here: native 900.0 us/step, eager 300.0 us/step at batch 8 on "
        f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}, measured "
        f"{next(iter(entries().values()))['measured']} at load {next(iter(entries().values()))['load']:.1f})"
    )
    rewrite(loop="native", native_us=30.0, eager_us=300.0)
    _, _, fast = fit(x, y, **FIELDS)
    assert fast.loop == "native"
    assert "faster here: native 30.0 us/step, eager 300.0 us/step at batch 8" in fast.notes[0]
    assert first.loop in ("native", "eager")


def test_figures_are_measured_once_and_reused_by_reruns(cache, monkeypatch):
    x, y = moons(64)
    real = crossover.measure
    _, _, first = fit(x, y, **FIELDS)
    kept = figures_file().read_bytes()
    assert figures_file().stat().st_mode & 0o777 == 0o600

    def refuse(*args: Any, **kwargs: Any) -> crossover.Figures:
        raise AssertionError("measured again")

    monkeypatch.setattr(crossover, "measure", refuse)
    _, _, again = fit(x, y, **FIELDS)
    assert again.loop == first.loop
    assert_same_run(first, again)  # same loop, same bits
    assert figures_file().read_bytes() == kept
    # Another shape is measured and added beside the first.
    monkeypatch.setattr(crossover, "measure", real)
    fit(x, y, **{**FIELDS, "batch_size": 4})
    assert len(entries()) == 2


def test_the_first_figures_kept_for_a_shape_win(cache):
    source = "/* a shape */"
    figures = crossover.Figures("native", 10.0, 100.0, 8, 8, 1, "2026-11-30T00:00:00Z", 1.0)
    assert crossover.record(source, figures) == figures
    later = replace(figures, loop="eager", native_us=200.0)
    assert crossover.record(source, later) == figures  # another worker measured the same shape first
    assert crossover.lookup(source) == figures


@pytest.mark.parametrize(
    "damage",
    ["not json", "wrong format", "another machine", "bad entry", "group-writable", "a symlink"],
)
def test_a_bad_or_foreign_file_is_ignored_and_replaced(cache, damage, tmp_path):
    source = "/* a shape */"
    figures = crossover.Figures("eager", 10.0, 5.0, 8, 8, 1, "2026-11-30T00:00:00Z", 1.0)
    crossover.record(source, figures)
    path = figures_file()
    good = json.loads(path.read_text())
    name = crossover.shape_key(source)
    if damage == "not json":
        path.write_text("{ not json")
    elif damage == "wrong format":
        path.write_text(json.dumps({**good, "format": 99}))
    elif damage == "another machine":
        path.write_text(json.dumps({**good, "machine": {**good["machine"], "cpu": "another CPU"}}))
    elif damage == "bad entry":
        path.write_text(json.dumps({**good, "shapes": {name: {**good["shapes"][name], "native_us": -1}}}))
    elif damage == "group-writable":
        path.chmod(0o664)
    else:
        elsewhere = tmp_path / "elsewhere.json"
        elsewhere.write_text(path.read_text())
        path.unlink()
        path.symlink_to(elsewhere)
    assert crossover.lookup(source) is None  # ignored: measured again
    other = replace(figures, loop="native", native_us=1.0)
    assert crossover.record(source, other) == other  # and replaced by a whole, private file
    assert crossover.lookup(source) == other
    assert not path.is_symlink()
    assert path.stat().st_mode & 0o777 == 0o600
    assert cache.stat().st_mode & 0o777 == 0o700


def test_a_loaded_job_runs_where_the_figures_say_on_bad_files_too(cache):
    x, y = moons(64)
    fit(x, y, **FIELDS)
    figures_file().write_text("garbage")
    _, _, result = fit(x, y, **FIELDS)  # measured again, the file rebuilt
    assert result.notes[0].startswith("training loop:")
    assert "faster here" in result.notes[0]
    assert len(entries()) == 1


def test_a_folder_others_can_write_runs_eager_and_says_why(cache):
    x, y = moons(64)
    cache.mkdir(mode=0o700)
    cache.chmod(0o777)
    _, _, result = fit(x, y, **FIELDS)
    assert result.loop == "eager"
    assert "writable by group or others" in result.notes[0]


def test_a_resumed_run_keeps_its_checkpoints_loop(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(native.NativeSteps, "chunk_steps", 3)  # mid-epoch checkpoints
    x, y = moons(64)
    fields = {**FIELDS, "epochs": 3, "batch_size": 4}
    fit(x, y, **{**fields, "epochs": 1})  # measure this shape
    for kept, flipped in (("native", "eager"), ("eager", "native")):
        rewrite(loop=kept, native_us=100.0, eager_us=100.0)
        taken: list[loop.Checkpoint] = []
        _, _, whole = fit(x, y, **fields, on_checkpoint=taken.append, checkpoint_every_s=0.0)
        assert whole.loop == kept
        checkpoint = next(c for c in taken if c.epoch == 1 and c.meta["step"] > 0)
        assert checkpoint.meta["loop"] == kept
        rewrite(loop=flipped)  # figures that now say otherwise (another machine's, a deleted file's)
        _, _, resumed = fit(x, y, **fields, resume=through_files(checkpoint, tmp_path))
        assert resumed.loop == kept
        assert f"the checkpoint this run resumes from ran {kept}" in resumed.notes[0]
        assert_same_run(whole, resumed)
    # The spec's own choice still wins.
    rewrite(loop="native")
    _, _, forced = fit(x, y, **fields, loop="eager", resume=through_files(checkpoint, tmp_path))
    assert forced.loop == "eager"


def test_a_checkpoint_from_before_the_loop_was_kept_is_measured_as_usual(cache, tmp_path):
    x, y = moons(64)
    taken: list[loop.Checkpoint] = []
    fit(x, y, **FIELDS, on_checkpoint=taken.append, checkpoint_every_s=0.0)
    old = taken[0]
    old.meta.pop("loop")
    rewrite(loop="eager", native_us=900.0, eager_us=300.0)
    _, _, resumed = fit(x, y, **FIELDS, resume=through_files(old, tmp_path))
    assert resumed.loop == "eager"
    assert "faster here" in resumed.notes[0]


def test_the_setting_forces_either_loop_without_measuring(cache, monkeypatch):
    x, y = moons(64)
    monkeypatch.setenv("TRAINSERVE_NATIVE_CHOICE", "eager")
    _, _, eager = fit(x, y, **FIELDS)
    assert eager.notes[0] == "training loop: eager PyTorch (TRAINSERVE_NATIVE_CHOICE=eager)"
    monkeypatch.setenv("TRAINSERVE_NATIVE_CHOICE", "native")
    _, _, fast = fit(x, y, **{**FIELDS, "batch_size": 64})
    assert fast.loop == "native"
    assert fast.notes[0].endswith("; TRAINSERVE_NATIVE_CHOICE=native)")
    assert not figures_file().exists()


def test_the_key_names_the_machine_but_not_the_threads_a_job_was_given(cache):
    here = crossover.machine_key()
    assert {"compiler_version", "flags", "cpu", "torch"} <= set(here)
    source = "/* a shape */"
    figures = crossover.Figures("eager", 10.0, 5.0, 8, 8, 1, "2026-11-30T00:00:00Z", 1.0)
    crossover.record(source, figures)
    threads = torch.get_num_threads()
    try:
        # A job given another thread count (the load changed) finds the same figures, so it
        # runs the same loop and gets the same bits.
        torch.set_num_threads(threads + 1)
        assert crossover.machine_key() == here
        assert crossover.lookup(source) == figures
    finally:
        torch.set_num_threads(threads)


def test_a_cache_that_cannot_be_written_costs_the_job_nothing(cache, monkeypatch):
    source = "/* a shape */"
    figures = crossover.Figures("native", 10.0, 100.0, 8, 8, 1, "2026-11-30T00:00:00Z", 1.0)

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(crossover, "_write", full_disk)
    assert crossover.record(source, figures) == figures  # used, not kept
    assert crossover.lookup(source) is None
    x, y = moons(64)
    _, _, result = fit(x, y, **FIELDS)  # measured, unkept, and trained
    assert result.loop in ("native", "eager")
    assert result.notes[0].startswith(f"training loop: {'native' if result.loop == 'native' else 'eager PyTorch'}")


# -- the measurement protocol, on steppers whose costs are known ---------------------------------------


class Spinner:
    """A stepper whose step costs ``base + per_row * rows`` seconds of this thread's CPU time
    (spent spinning, so that wall time is at least that too); it notes the rows it saw."""

    name = "spinner"
    chunk_steps = 1

    def __init__(self, base: float, per_row: float, batch_size: int) -> None:
        self.base, self.per_row, self.batch_size = base, per_row, batch_size
        self.rows: list[int] = []

    def run(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        order: torch.Tensor | None,
        start: int,
        stop: int,
        loss_sum: torch.Tensor,
    ) -> None:
        assert order is not None
        for b in range(start, stop):
            rows = len(order[b * self.batch_size : (b + 1) * self.batch_size])
            self.rows.append(rows)
            until = time.thread_time() + self.base + self.per_row * rows
            while time.thread_time() < until:
                pass


def measure(eager: Spinner, fast: Spinner, batch_size: int) -> crossover.Figures:
    x, y = torch.zeros(10, 2), torch.zeros(10)
    return crossover.measure(eager, fast, x, y, torch.arange(10), batch_size)


def test_measure_picks_native_where_its_steps_are_ten_times_cheaper():
    eager, fast = Spinner(0.004, 0.0, 16), Spinner(0.0, 0.0004 / 16, 16)
    figures = measure(eager, fast, 16)
    assert figures.loop == "native"
    assert figures.native_rows == 16
    assert figures.native_us < figures.eager_us


def test_measure_stops_early_where_native_is_clearly_slower():
    batch = 256
    eager, fast = Spinner(0.002, 0.0, batch), Spinner(0.0, 0.2 / batch, batch)  # native 100x at the batch
    figures = measure(eager, fast, batch)
    assert figures.loop == "eager"
    assert figures.native_rows < batch  # stopped on a partial batch...
    assert max(fast.rows) < batch  # ...and never paid for a whole one
    assert "stopped at" in figures.describe()


def test_figures_parse_only_valid_entries():
    good = asdict(crossover.Figures("native", 1.0, 2.0, 8, 8, 1, "t", 0.5))
    assert crossover.Figures.parse(good) is not None
    broken: Any
    for broken in ({**good, "loop": "compiled"}, {**good, "eager_us": float("nan")}, {"loop": "native"}, [], None):
        assert crossover.Figures.parse(broken) is None
    assert np.isfinite(crossover.Figures.parse(good).native_us)  # type: ignore[union-attr]
    assert os.path.basename(str(crossover.calibration_file())).startswith("crossover-")
