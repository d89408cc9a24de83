"""A sweep's trial as the sampler and pruner see it, and the stop a pruner raises: plain
classes, apart from ``study.py``, so that the worker and the API can name them without
importing Optuna (0.4 s of every start), which only asking for or pruning a trial needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrialView:
    """What the study needs of one trial row."""

    number: int
    params: dict[str, Any]
    state: str
    value: float | None = None
    intermediate: Sequence[Sequence[Any]] = ()
    system_attrs: dict[str, Any] = field(default_factory=dict)


class TrialPruned(Exception):
    """Raised from a trial's epoch hook when the sweep's pruner stops it."""

    def __init__(self, epoch: int, reason: str) -> None:
        super().__init__(reason)
        self.epoch, self.reason = epoch, reason
