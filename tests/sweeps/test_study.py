"""The Optuna study rebuilt from trial rows: any process asking gets the same answer, and a
grid is walked once whatever process asks for each point."""

from __future__ import annotations

import pytest

from trainserve.sweeps.space import SweepRequest, space_of
from trainserve.sweeps.study import Pruning, ask
from trainserve.sweeps.trials import TrialPruned, TrialView

BASE = {"optimizer": {"type": "Adam", "lr": 0.01}, "batch_size": 8, "epochs": 10, "validation_split": 0.2}


def request(**changes: object) -> SweepRequest:
    fields: dict[str, object] = {
        "base": BASE,
        "search": {"optimizer.lr": {"log_uniform": [1e-4, 1e-1]}, "batch_size": {"choice": [4, 8, 16]}},
        "trials": 6,
        **changes,
    }
    return SweepRequest.model_validate(fields)


def test_the_same_rows_give_the_same_next_trial_and_the_grid_is_walked_once() -> None:
    for sampler in ("tpe", "random"):
        sweep = request(sampler=sampler)
        trials: list[TrialView] = []
        for number in range(6):
            params, attrs = ask(sweep, space_of(sweep), trials)
            # Asked again from the same rows (another process, after a restart): the same answer.
            assert ask(sweep, space_of(sweep), trials) == (params, attrs)
            trials.append(TrialView(number, params, "complete", value=params["optimizer.lr"], system_attrs=attrs))
        assert len({repr(t.params) for t in trials}) == 6

    grid = request(sampler="grid", search={"batch_size": {"choice": [4, 8, 16]}, "epochs": {"int_uniform": [1, 2]}})
    walked: list[TrialView] = []
    for number in range(6):
        params, attrs = ask(grid, space_of(grid), walked)
        walked.append(TrialView(number, params, "active", system_attrs=attrs))
    assert sorted((t.params["batch_size"], t.params["epochs"]) for t in walked) == [
        (b, e) for b in (4, 8, 16) for e in (1, 2)
    ]


def test_the_median_pruner_stops_a_trial_behind_the_complete_ones() -> None:
    sweep = request(pruner={"type": "median", "startup_trials": 1, "warmup_epochs": 1})
    done = TrialView(0, {"optimizer.lr": 0.01, "batch_size": 8}, "complete", 0.1, [[1, 0.5], [2, 0.3], [3, 0.1]])
    clock = iter(range(100))
    params = {"optimizer.lr": 0.001, "batch_size": 4}
    pruning = Pruning(sweep, space_of(sweep), params, lambda: [done], refresh_s=10, clock=lambda: next(clock))
    pruning.report(1, 0.6)  # behind already, but inside the warm-up
    with pytest.raises(TrialPruned) as pruned:
        pruning.report(2, 0.55)
    assert pruned.value.epoch == 2
    assert "median" in pruned.value.reason
    assert "0.3" in pruned.value.reason  # the complete trial's value at that epoch
    assert pruning.values == [(1, 0.6), (2, 0.55)]
