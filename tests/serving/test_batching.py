"""Unit tests for trainserve.serving.batching: MicroBatcher with real trained models on a real
event loop, driven as the /predict route drives it (``arrive`` on entry, then ``infer`` or
``leave``).

What it promises: a request's answer is the one it gets alone, bit for bit, whoever shares
its forward pass; a pass never mixes models (nor two loads of one model) and never takes a
request whose rows do not fit; a bad request fails alone; a batch waits for the requests on
their way no longer than its bound, and not at all once it is full or nobody else is coming.
Grouping is read from the rows of the pass that each answer reports, never from a clock.

CPU only, tiny networks: the whole file runs in about a second.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from tests.small_models import MoonsClassifier, fit, linear, save_and_load, wave
from trainserve.errors import InvalidInput
from trainserve.serving.batching import MicroBatcher
from trainserve.serving.predictor import Outcome, Predictor

# A bound no test waits out: a batch that ran on this timer would never answer in time.
FOREVER_S = 3600.0
# How long any scenario may take before it counts as hung (a request left waiting forever).
HUNG_S = 10.0

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Models:
    moons: Predictor
    other: Predictor  # the same weights under another model id
    wave: Predictor  # a regressor of one feature
    rows: np.ndarray  # moons inputs, float32
    wave_rows: np.ndarray


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, moons_classifier: MoonsClassifier) -> Models:
    x, _, spec, plan, result = moons_classifier
    folder: Path = tmp_path_factory.mktemp("batching")
    wx, wy = wave(100)
    wave_spec, wave_plan, wave_result = fit(wx, wy, model=[linear(8), "Tanh", linear(1)], loss="MSELoss", epochs=3)
    served = Models(
        moons=save_and_load(folder, spec, plan, result),
        other=save_and_load(folder, spec, plan, result),
        wave=save_and_load(folder, wave_spec, wave_plan, wave_result),
        rows=x.astype(np.float32),
        wave_rows=wx.astype(np.float32),
    )
    assert served.moons.rowwise is not None
    assert served.wave.rowwise is not None
    return served


def run(scenario: Awaitable[T]) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(scenario, HUNG_S)

    return asyncio.run(guarded())


async def together(
    batcher: MicroBatcher, requests: list[tuple[Predictor, np.ndarray, int]]
) -> list[tuple[Outcome, int] | BaseException]:
    """Requests that enter the route together: each arrives at once, then spends its number of
    loop turns (reading and parsing its body) before it joins a batch. Answers in order."""

    async def one(predictor: Predictor, x: np.ndarray, turns: int) -> tuple[Outcome, int]:
        for _ in range(turns):
            await asyncio.sleep(0)
        return await batcher.infer(predictor, x)

    for _ in requests:
        batcher.arrive()
    return await asyncio.gather(*(one(*request) for request in requests), return_exceptions=True)


def answered(result: tuple[Outcome, int] | BaseException) -> tuple[Outcome, int]:
    assert not isinstance(result, BaseException), repr(result)
    return result


def assert_as_alone(predictor: Predictor, x: np.ndarray, outcome: Outcome) -> None:
    """The answer is, to the last bit, the one the request gets on its own."""
    alone = predictor.infer(x)
    assert np.array_equal(outcome.predictions, alone.predictions)
    if alone.probabilities is None:
        assert outcome.probabilities is None
    else:
        assert outcome.probabilities is not None
        assert outcome.probabilities.dtype == alone.probabilities.dtype
        assert np.array_equal(outcome.probabilities, alone.probabilities)


def test_requests_that_come_together_share_one_pass_and_get_their_answers_alone(models: Models) -> None:
    sizes, turns = [1, 3, 1, 5, 2, 1], [0, 2, 1, 0, 3, 1]
    starts = np.cumsum([0, *sizes])[:-1] * 7  # rows from all over the data set
    inputs = [models.rows[s : s + n] for s, n in zip(starts, sizes, strict=True)]
    batcher = MicroBatcher(enabled=True, max_wait_s=FOREVER_S, max_rows=64)

    results = run(together(batcher, [(models.moons, x, t) for x, t in zip(inputs, turns, strict=True)]))

    for x, result in zip(inputs, results, strict=True):
        outcome, pass_rows = answered(result)
        assert pass_rows == sum(sizes)  # one forward pass for all of them
        assert len(outcome.predictions) == len(x)
        assert_as_alone(models.moons, x, outcome)
        # ... and the one the same request gets from the batcher with nobody else around.
        alone = MicroBatcher(enabled=True, max_wait_s=FOREVER_S, max_rows=64)
        solo, solo_rows = answered(run(together(alone, [(models.moons, x, 0)]))[0])
        assert solo_rows == len(x)
        assert np.array_equal(solo.predictions, outcome.predictions)
        assert solo.probabilities is not None
        assert outcome.probabilities is not None
        assert np.array_equal(solo.probabilities, outcome.probabilities)


def test_passes_never_mix_models_nor_two_loads_of_one_model(models: Models) -> None:
    # The model loaded again (the cache dropped and reloaded it): same id, another object.
    reloaded = dataclasses.replace(models.moons)
    assert reloaded.model_id == models.moons.model_id
    assert reloaded is not models.moons
    requests = [
        (models.moons, models.rows[0:2], 0),
        (models.other, models.rows[2:5], 0),
        (models.wave, models.wave_rows[0:1], 0),
        (models.moons, models.rows[5:9], 1),
        (models.wave, models.wave_rows[1:3], 1),
        (reloaded, models.rows[9:10], 2),  # last, so that the first load's batch is whole when it comes
        (models.other, models.rows[10:11], 2),
    ]
    batcher = MicroBatcher(enabled=True, max_wait_s=FOREVER_S, max_rows=64)

    results = run(together(batcher, requests))

    for (predictor, x, _), result in zip(requests, results, strict=True):
        outcome, pass_rows = answered(result)
        # The pass held exactly the rows of the requests for this very predictor object.
        assert pass_rows == sum(len(other_x) for p, other_x, _ in requests if p is predictor)
        assert_as_alone(predictor, x, outcome)
    assert [answered(r)[1] for r in results] == [6, 4, 3, 6, 3, 1, 4]


@pytest.mark.parametrize("bad_at", [0, 1, 2])
@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 3), np.float32), np.zeros(2, np.float32)],
    ids=["three-columns", "one-dimensional"],
)
def test_a_request_whose_rows_do_not_fit_fails_alone(models: Models, bad: np.ndarray, bad_at: int) -> None:
    good = [models.rows[0:2], models.rows[2:5]]
    inputs = [*good]
    inputs.insert(bad_at, bad)  # first, between, or last to come: the others are answered all the same
    batcher = MicroBatcher(enabled=True, max_wait_s=FOREVER_S, max_rows=64)

    results = run(together(batcher, [(models.moons, x, turn) for turn, x in enumerate(inputs)]))

    refused = results.pop(bad_at)
    assert isinstance(refused, InvalidInput)
    assert "the model takes 2 features" in refused.detail
    for x, result in zip(good, results, strict=True):
        outcome, pass_rows = answered(result)
        assert pass_rows == 5
        assert_as_alone(models.moons, x, outcome)


def test_a_lone_request_runs_after_one_loop_turn_not_on_the_timer(models: Models) -> None:
    x = models.rows[:3]
    batcher = MicroBatcher(enabled=True, max_wait_s=FOREVER_S, max_rows=64)
    outcome, pass_rows = answered(run(together(batcher, [(models.moons, x, 0)]))[0])
    assert pass_rows == 3
    assert_as_alone(models.moons, x, outcome)


def test_a_full_batch_runs_at_once_without_waiting_for_the_requests_on_their_way(models: Models) -> None:
    batcher = MicroBatcher(enabled=True, max_wait_s=FOREVER_S, max_rows=8)

    async def scenario() -> list[tuple[Outcome, int]]:
        for _ in range(3):
            batcher.arrive()  # the third is still reading its body when the batch fills up
        answers = await asyncio.gather(
            batcher.infer(models.moons, models.rows[0:4]), batcher.infer(models.moons, models.rows[4:8])
        )
        batcher.leave()  # the third gives up
        return answers

    answers = run(scenario())
    assert [rows for _, rows in answers] == [8, 8]
    assert_as_alone(models.moons, models.rows[0:4], answers[0][0])
    assert_as_alone(models.moons, models.rows[4:8], answers[1][0])


def test_a_batch_waits_for_requests_on_their_way_but_no_longer_than_its_bound(models: Models) -> None:
    # Long enough that the turns below never outlast it, short enough to wait out.
    batcher = MicroBatcher(enabled=True, max_wait_s=0.5, max_rows=64)
    first_x, late_x = models.rows[0:2], models.rows[2:5]

    async def scenario() -> tuple[bool, tuple[Outcome, int], tuple[Outcome, int]]:
        batcher.arrive()
        batcher.arrive()  # a second request is on its way, and late
        first = asyncio.ensure_future(batcher.infer(models.moons, first_x))
        for _ in range(20):
            await asyncio.sleep(0)
        waited = not first.done()  # the batch holds the first request for the one on its way
        first_answer = await first  # ... until its bound: it never comes in time
        return waited, first_answer, await batcher.infer(models.moons, late_x)

    waited, (first, first_rows), (late, late_rows) = run(scenario())
    assert waited
    assert (first_rows, late_rows) == (2, 3)  # the late request came after the pass, in one of its own
    assert_as_alone(models.moons, first_x, first)
    assert_as_alone(models.moons, late_x, late)


def test_only_small_requests_for_models_with_a_rowwise_pass_are_batched(models: Models) -> None:
    batcher = MicroBatcher(enabled=True, max_wait_s=FOREVER_S, max_rows=64)
    assert batcher.accepts(models.moons, 1)
    assert batcher.accepts(models.moons, 63)
    assert not batcher.accepts(models.moons, 64)
    assert not batcher.accepts(dataclasses.replace(models.moons, rowwise=None), 1)  # served by torch alone
    assert not MicroBatcher(enabled=False, max_wait_s=FOREVER_S, max_rows=64).accepts(models.moons, 1)
