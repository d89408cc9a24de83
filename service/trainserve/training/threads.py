"""How many intra-op threads a training step or a large forward pass gets.

torch's default is one thread per core, which is right only when every core is free and
the step is large. A step split over threads waits for the slowest of them at every
operator: when other programs keep a core busy, that thread is scheduled late and each
step waits for it (measured on the 2-core machine: 0.8 s per epoch on one thread against
21.5 s on two, with one other process spinning). And a small step (a few million
multiply-adds) spends more on handing work to threads than it saves.

So the choice is: one thread unless the step is large (``WORK_PER_THREAD`` parameter-rows
per extra thread), and never more threads than cores that are free right now. Free
cores are the cores this process may run on (``os.sched_getaffinity``) minus the cores
the other processes keep busy, sampled from ``/proc/stat`` over a short window; this
process's own use in that window (an API answering a request, a worker warming a model)
is subtracted, since it is the very work being placed.

A worker keeps the load sampled in the background (``keep_sampling``), so that a job
starting reads the last 0.2 s window at once instead of waiting for one: that wait was
0.2 s of every job's end-to-end time (docs/performance-16.md).

What the thread count may change: torch splits a reduction over more than 32,768
elements (``at::internal::GRAIN_SIZE``) into one partial sum per thread, so a sum or mean
that long differs in its last bits between 1 and 2 threads (measured: the mean of 40,000
floats). The training steps of the issue's shapes have none that long (their weights were
the same, bit for bit, at 1 and 2 threads), but a whole split's loss has:
``one_thread`` runs such reductions on one thread whatever the policy chose.

Knows os and torch only (torch imported where used: the API imports this module before it
loads torch); where ``/proc`` is absent (macOS), every allowed core counts free.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

# Parameter-rows (batch x parameters, about the multiply-adds of one forward pass) below
# which a step runs on one thread, and per extra thread above. Measured on the 2-core
# machine (docs/performance-16.md): the 200,000 x 20, 20-128-128-2 MLP at batch 256 (5.0M)
# ran as fast on one thread as on two on an idle machine and far slower on two on a busy
# one; 32-256-256-1 at batch 4096 (305M) ran 1.6x faster on two when both were free.
WORK_PER_THREAD = 32_000_000
# A core counts busy once other processes use this share of it (40%): a thread placed on
# a core that is that much taken is scheduled late on many steps.
_BUSY_SHARE = 0.4
SAMPLE_S = 0.2


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    work: int  # parameter-rows per step
    allowed: int  # cores this process may run on
    free: int  # of those, free when sampled
    source: str  # "policy" or the setting that overrode it

    def note(self) -> str:
        if self.source != "policy":
            return f"intra-op threads: {self.threads} (set by {self.source})"
        return (
            f"intra-op threads: {self.threads} (work per step {self.work:,} parameter-rows; "
            f"{self.free} of {self.allowed} cores free)"
        )


def allowed_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _system_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks over all cores since boot; None without /proc."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _own_ticks() -> int:
    """This process's user + system clock ticks (all its threads)."""
    try:
        with open("/proc/self/stat") as f:
            text = f.read()
    except OSError:
        return 0
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


class LoadSampler:
    """Cores busy with other processes' work, from /proc/stat deltas.

    ``sample(wait)`` reads two snapshots ``wait`` seconds apart. ``latest()`` does not
    block: it measures from the previous call's snapshot (an API asks on each large
    request; a window of at least ``SAMPLE_S`` is used, or the last figure kept)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[float, tuple[int, int], int] | None = None
        self._busy_cores = 0.0

    def _snapshot(self) -> tuple[float, tuple[int, int], int] | None:
        system = _system_ticks()
        return None if system is None else (time.monotonic(), system, _own_ticks())

    def _update(self, before: tuple[float, tuple[int, int], int], after: tuple[float, tuple[int, int], int]) -> None:
        (_, (busy0, total0), own0), (_, (busy1, total1), own1) = before, after
        total = total1 - total0
        if total <= 0:
            return
        cores = os.cpu_count() or 1
        other = max(0, (busy1 - busy0) - (own1 - own0))
        self._busy_cores = cores * other / total

    def sample(self, wait: float = SAMPLE_S) -> float:
        before = self._snapshot()
        if before is None:
            return 0.0
        time.sleep(wait)
        after = self._snapshot()
        assert after is not None
        with self._lock:
            self._update(before, after)
            self._last = after
            return self._busy_cores

    def latest(self) -> float:
        now = self._snapshot()
        if now is None:
            return 0.0
        with self._lock:
            if self._last is None:
                self._last = now
            elif now[0] - self._last[0] >= SAMPLE_S:
                self._update(self._last, now)
                self._last = now
            return self._busy_cores


_sampler = LoadSampler()
_background: threading.Thread | None = None
_background_lock = threading.Lock()


def keep_sampling(period: float = SAMPLE_S) -> None:
    """Sample the load every ``period`` seconds in a daemon thread, from now on (idempotent).

    ``choose(wait=None)`` then reads a window of at least ``SAMPLE_S`` that ended at most
    ``period`` ago, without waiting. Costs two small /proc reads per period."""
    global _background
    with _background_lock:
        if _background is not None and _background.is_alive():
            return

        def tick() -> None:
            while True:
                _sampler.latest()
                time.sleep(period)

        _background = threading.Thread(target=tick, name="load-sampler", daemon=True)
        _background.start()


def sampling() -> bool:
    """Whether ``keep_sampling`` runs in this process."""
    return _background is not None and _background.is_alive()


def free_cores(busy_cores: float, allowed: int | None = None) -> int:
    """Allowed cores not kept busy by other processes; at least one."""
    allowed = allowed_cores() if allowed is None else allowed
    total = os.cpu_count() or allowed
    # Other work may sit on cores outside our affinity; only what spills over counts.
    spill = max(0.0, busy_cores - max(0, total - allowed))
    busy = math.floor(spill + (1 - _BUSY_SHARE))
    return max(1, allowed - busy)


def threads_for(work: int, free: int) -> int:
    """Threads for a step of ``work`` parameter-rows when ``free`` cores are free."""
    return max(1, min(free, work // WORK_PER_THREAD))


def choose(work: int, *, override: int | None = None, wait: float | None = SAMPLE_S) -> ThreadChoice:
    """The threads for a step of ``work`` parameter-rows; ``override`` (a setting) wins.

    ``wait``: seconds to sample the load for (a job start can afford it); None uses the
    figure from the previous call's window (never blocks: for a request path)."""
    allowed = allowed_cores()
    if override is not None:
        return ThreadChoice(override, work, allowed, allowed, "TRAINSERVE_TRAIN_THREADS")
    busy = _sampler.latest() if wait is None else _sampler.sample(wait)
    free = free_cores(busy, allowed)
    return ThreadChoice(threads_for(work, free), work, allowed, free, "policy")


def apply(threads: int) -> None:
    """Set torch's intra-op threads for this process, if they differ (setting them is not free)."""
    import torch  # here, not above: the API process chooses threads before it has loaded torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block's torch ops on one thread, then restore the count: for reductions over
    more elements than torch's grain (a whole split's loss and accuracy), whose last bits
    would otherwise depend on how many threads the policy chose (see the module's doc)."""
    import torch

    before = torch.get_num_threads()
    apply(1)
    try:
        yield
    finally:
        apply(before)
