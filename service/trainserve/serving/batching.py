"""Micro-batching: concurrent small prediction requests for one model share one forward pass.

Runs on the API's event loop. A request that joins a batch waits until one of:

- the batch holds ``max_rows`` rows;
- the event loop has run everything that was ready when the batch opened (requests that
  arrived together have all had their turn to join) and no other prediction request is
  part-way through the route; so a lone client waits one loop turn, no timer;
- ``max_wait_s`` has passed since the batch opened (the bound on the added latency).

The forward pass then runs once over the concatenated rows and each request gets its own
slice of the answer. That pass is the row-wise generated one (``Predictor.infer_rowwise``),
which computes every row on its own: a request's answer is the one it gets alone, to the
last bit, whoever it shared the pass with (torch's matrix kernels round differently with
the number of rows). So only models with a row-wise pass are batched, and only those
cheap enough to run on the event loop (``Predictor.runs_inline``); others run one request
per pass.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from trainserve.errors import InvalidInput
from trainserve.serving.predictor import Outcome, Predictor


@dataclass
class _OpenBatch:
    predictor: Predictor
    parts: list[tuple[np.ndarray, asyncio.Future[tuple[Outcome, int]]]] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None
    soon: asyncio.Handle | None = None


class MicroBatcher:
    def __init__(self, *, enabled: bool, max_wait_s: float, max_rows: int) -> None:
        self.enabled, self.max_wait_s, self.max_rows = enabled, max_wait_s, max_rows
        self._open: dict[str, _OpenBatch] = {}
        self._approaching = 0  # requests inside the route that have not joined a batch or left

    def arrive(self) -> None:
        """A prediction request entered the route: batches may wait for it."""
        self._approaching += 1

    def leave(self) -> None:
        """A request that arrived will not join a batch (an error, a large or CSV request)."""
        self._approaching -= 1
        if self._approaching == 0:
            for batch in self._open.values():
                self._run_soon(batch)

    def accepts(self, predictor: Predictor, n_rows: int) -> bool:
        return (
            self.enabled
            and n_rows < self.max_rows
            and predictor.takes_rowwise(n_rows)
            and predictor.runs_inline(self.max_rows)
        )

    async def infer(self, predictor: Predictor, x: np.ndarray) -> tuple[Outcome, int]:
        """This request's answer, and the number of rows in the forward pass that produced it.
        Counts as the request's ``leave``.

        Rows that do not fit the model are refused here, before they join: a pass
        concatenates its requests, and one such request would break it and leave all of them unanswered."""
        width = len(predictor.features)
        if x.ndim != 2 or x.shape[1] != width:
            self.leave()
            raise InvalidInput(f"inputs of shape {x.shape} do not fit: the model takes {width} features a row")
        self._approaching -= 1
        loop = asyncio.get_running_loop()
        batch = self._open.get(predictor.model_id)
        if batch is None:
            batch = self._open[predictor.model_id] = _OpenBatch(predictor)
        elif batch.predictor is not predictor:  # the model was reloaded meanwhile: keep batches apart
            self._run(predictor.model_id)
            batch = self._open[predictor.model_id] = _OpenBatch(predictor)
        future: asyncio.Future[tuple[Outcome, int]] = loop.create_future()
        batch.parts.append((x, future))
        batch.rows += len(x)
        if batch.rows >= self.max_rows:
            self._run(predictor.model_id)
        elif self._approaching == 0:
            # Nobody is part-way through the route: run after this loop turn. This may also
            # have been the request another model's batch was waiting for.
            for open_batch in self._open.values():
                self._run_soon(open_batch)
        elif batch.timer is None:  # wait for the requests on their way, but not for long
            batch.timer = loop.call_later(self.max_wait_s, self._run, predictor.model_id)
        return await future

    def _run_soon(self, batch: _OpenBatch) -> None:
        """Run the batch once the loop has run what is ready now: requests that arrived in
        the same turn join first."""
        if batch.soon is None:
            batch.soon = asyncio.get_running_loop().call_soon(self._run_if_settled, batch)

    def _run_if_settled(self, batch: _OpenBatch) -> None:
        batch.soon = None
        if self._open.get(batch.predictor.model_id) is not batch:
            return  # already run (full, or by its timer)
        if self._approaching == 0:
            self._run(batch.predictor.model_id)
        # else a request joined the route meanwhile: it will join or leave, and reschedule

    def _run(self, model_id: str) -> None:
        batch = self._open.pop(model_id, None)
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        if batch.soon is not None:
            batch.soon.cancel()
        parts = batch.parts
        x = parts[0][0] if len(parts) == 1 else np.concatenate([part for part, _ in parts])
        try:
            outcome = batch.predictor.infer_rowwise(x)
        except Exception as exc:
            for _, future in parts:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for part, future in parts:
            stop = start + len(part)
            if not future.done():  # a client that hung up cancels its future
                future.set_result((outcome.rows(start, stop), len(x)))
            start = stop
