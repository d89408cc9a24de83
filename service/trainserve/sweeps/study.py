"""Optuna, driven by ask-and-tell over a study rebuilt in memory from a sweep's trial rows.

Our tables are the truth (``sweeps``, ``sweep_trials``): each time the sampler is asked
for a trial, or the pruner is asked about one, an in-memory study is built from the rows
(parameters, state, value, per-epoch values and Optuna's per-trial bookkeeping), so any
process can drive any sweep, and a restart resumes it exactly. The sampler for trial
``n`` is seeded with ``seed + n``: the same sweep on the same data asks the same
questions and gets the same answers (see docs/sweeps.md for why not Optuna's RDBStorage).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.pruners import BasePruner, MedianPruner, NopPruner, SuccessiveHalvingPruner
from optuna.samplers import BaseSampler, GridSampler, RandomSampler, TPESampler
from optuna.trial import TrialState, create_trial

from trainserve.sweeps.space import Pruner, Space, SweepRequest
from trainserve.sweeps.trials import TrialPruned, TrialView

optuna.logging.set_verbosity(optuna.logging.WARNING)

# A trial row's state, as Optuna sees it. A trial whose job was cancelled counts as failed:
# it has no value, and the sampler should not try to learn from it.
_STATES = {
    "active": TrialState.RUNNING,
    "complete": TrialState.COMPLETE,
    "pruned": TrialState.PRUNED,
    "failed": TrialState.FAIL,
    "cancelled": TrialState.FAIL,
}


def sampler_for(request: SweepRequest, space: Space, number: int) -> BaseSampler:
    """The sampler that picks trial ``number``'s parameters."""
    if request.sampler == "grid":
        grid = space.grid()
        assert grid is not None, "checked at submit"
        # One seed for the whole grid: it orders the unvisited points the same way every time.
        return GridSampler(grid, seed=request.seed)
    if request.sampler == "random":
        return RandomSampler(seed=request.seed + number)
    return TPESampler(seed=request.seed + number)


def pruner_for(pruner: Pruner) -> BasePruner:
    if pruner.type == "median":
        # Epochs are steps 1, 2, ...: Optuna prunes at a step >= n_warmup_steps, so the first
        # ``warmup_epochs`` epochs are exempt with one more.
        return MedianPruner(n_startup_trials=pruner.startup_trials, n_warmup_steps=pruner.warmup_epochs + 1)
    if pruner.type == "asha":
        return SuccessiveHalvingPruner(
            min_resource=pruner.min_resource or "auto", reduction_factor=pruner.reduction_factor
        )
    return NopPruner()


def build_study(request: SweepRequest, space: Space, trials: Sequence[TrialView], sampler: BaseSampler) -> optuna.Study:
    """An in-memory study holding ``trials`` (numbered 0, 1, ... as the rows are)."""
    study = optuna.create_study(
        direction=request.objective.direction, sampler=sampler, pruner=pruner_for(request.pruner)
    )
    distributions = space.distributions()
    for trial in sorted(trials, key=lambda t: t.number):
        state = _STATES[trial.state]
        value = trial.value if trial.value is not None and math.isfinite(trial.value) else None
        if state == TrialState.COMPLETE and value is None:
            state = TrialState.FAIL
        study.add_trial(
            create_trial(
                state=state,
                params={k: v for k, v in trial.params.items() if k in distributions},
                distributions={k: d for k, d in distributions.items() if k in trial.params},
                value=value if state in (TrialState.COMPLETE, TrialState.PRUNED) else None,
                intermediate_values={int(e): float(v) for e, v in trial.intermediate if math.isfinite(v)},
                system_attrs=trial.system_attrs,
            )
        )
    return study


def ask(request: SweepRequest, space: Space, trials: Sequence[TrialView]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The next trial's parameters and Optuna's bookkeeping for it (e.g. the grid point)."""
    number = len(trials)
    study = build_study(request, space, trials, sampler_for(request, space, number))
    trial = study.ask(space.distributions())
    frozen = study.get_trials(deepcopy=False)[trial.number]
    return dict(trial.params), dict(frozen.system_attrs)


def median_at(trials: Sequence[TrialView], epoch: int) -> float | None:
    """The median value of the complete trials at ``epoch`` (for the pruned trial's reason)."""
    values = [float(v) for t in trials if t.state == "complete" for e, v in t.intermediate if int(e) == epoch]
    return statistics.median(values) if values else None


class Pruning:
    """Reports a running trial's per-epoch objective to the sweep's pruner.

    The other trials are read again at most every ``refresh_s`` seconds (``load_others``),
    so the check costs microseconds per epoch; this trial's own values are replayed into
    each rebuilt study.
    """

    def __init__(
        self,
        request: SweepRequest,
        space: Space,
        params: dict[str, Any],
        load_others: Any,
        *,
        refresh_s: float,
        clock: Any,
    ) -> None:
        self.request, self.space, self.params = request, space, params
        self.load_others, self.refresh_s, self.clock = load_others, refresh_s, clock
        self.values: list[tuple[int, float]] = []
        self.metric = request.metric()
        self._study: optuna.Study | None = None
        self._trial: optuna.Trial | None = None
        self._others: Sequence[TrialView] = ()
        self._built_at = -math.inf

    def value_of(self, epoch: int, train_loss: float, val_loss: float | None, val_metrics: Any) -> float | None:
        split, _, name = self.metric.partition("_")
        if self.metric == "train_loss":
            return train_loss
        if self.metric == "val_loss":
            return val_loss
        if split == "val" and isinstance(val_metrics, dict):
            value = val_metrics.get(name)
            return float(value) if value is not None else None
        return None  # train metrics other than the loss are measured only at the end

    def _rebuild(self) -> None:
        self._others = self.load_others()
        study = build_study(self.request, self.space, self._others, RandomSampler(seed=0))
        study.enqueue_trial(self.params)
        trial = study.ask(self.space.distributions())
        for epoch, value in self.values[:-1]:
            trial.report(value, epoch)
        self._study, self._trial, self._built_at = study, trial, self.clock()

    def report(self, epoch: int, value: float | None) -> None:
        """Record the epoch's value; TrialPruned if the pruner says stop."""
        if value is None or not math.isfinite(value):
            return
        if self.values and self.values[-1][0] >= epoch:
            return  # replayed after a resume
        self.values.append((epoch, value))
        if self.request.pruner.type == "none":
            return
        if self._trial is None or self.clock() - self._built_at >= self.refresh_s:
            self._rebuild()
        else:
            assert self._trial is not None
        assert self._trial is not None
        self._trial.report(value, epoch)
        if self._trial.should_prune():
            raise TrialPruned(epoch, self._reason(epoch, value))

    def _reason(self, epoch: int, value: float) -> str:
        pruner = self.request.pruner
        if pruner.type == "median":
            median = median_at(self._others, epoch)
            than = f"the median of the complete trials ({median:.4g})" if median is not None else "the median"
            return f"pruned at epoch {epoch} by the median pruner: {self.metric} {value:.4g} is worse than {than}"
        return (
            f"pruned at epoch {epoch} by ASHA: {self.metric} {value:.4g} is not in the best "
            f"1/{pruner.reduction_factor} of the trials that reached this rung"
        )

    def system_attrs(self) -> dict[str, Any]:
        """Optuna's bookkeeping for this trial (ASHA's rungs), to store with the trial."""
        if self._study is None or self._trial is None:
            return {}
        frozen = self._study.get_trials(deepcopy=False)[self._trial.number]
        return {k: v for k, v in frozen.system_attrs.items() if k != "fixed_params"}
