"""Which loop, native or eager, trains a spec faster on this machine: measured, then kept.

The native loop (``native.NativeSteps``) removes eager PyTorch's per-step overhead but does
its arithmetic in plain C loops on one core; eager PyTorch pays the overhead and then runs
BLAS kernels. Which wins depends on the batch, the widths, the optimizer, the machine's
cores and torch's threads, so no fixed threshold gets it right (a fixed cap once ran a
batch of 32 eagerly at 0.89x a plain loop while native would have been 12x). Instead, the
first job of a shape on a machine times a few steps of each loop on throwaway copies of its
network and its own rows, and the answer is kept in a JSON file beside the compiled code:

- the file is named by what the timing depends on and the native cache's key does not
  cover (the compiler and flags, the OS, the CPU, torch's version; not the intra-op
  threads, which follow the load: the first figures stand whatever a later job's count),
  and holds one entry per shape, named by the sha256 of the shape's generated C source
  (which spells out every width, the batch, the layers, the loss and the optimizer);
- the first entry written for a shape stays: a rerun of the same spec on the same machine
  picks the same loop, and so gets the same bits (native and eager round differently);
- a file that is not ours, not valid, or made for another machine is ignored and
  replaced; the folder rules are the native cache's (0700, this user's).

The timing costs about 0.2 s, or a few eager steps' worth where one is longer than 15 ms,
once per shape per machine. Where native is far slower the measurement stops early: native
steps are timed on growing partial batches, and a step's cost only grows with its rows.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import platform
import stat
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainserve.training import native

if TYPE_CHECKING:  # loop imports this module; the protocol is only a type here
    from trainserve.training.loop import Steps

log = logging.getLogger(__name__)

FORMAT = 1
# A timed call lasts at least this long: over several of the scheduler's time slices, so that
# on a busy machine it sees what a whole run sees (eager loses more than native to other
# processes: its caches are refilled after each switch), and the clock's cost vanishes.
CHUNK_S = 0.015
ROUNDS = 5  # timed calls per loop, interleaved so both see the same load; the median counts
MAX_CHUNK_STEPS = 64
# A native partial step this many times slower than a whole eager step ends the measurement:
# native's cost only grows with the rows, and the margin covers the call's fixed cost.
CLEARLY_SLOWER = 1.5
# The kept file grows by about 300 bytes a shape: this is some 200,000 shapes, and a bound on
# what a foreign file can make a worker read.
MAX_FILE_BYTES = 1 << 26


@dataclass(frozen=True)
class Figures:
    """One shape's measurement: the loop chosen and the time per step of each."""

    loop: str  # "native" or "eager"
    native_us: float  # per step; a lower bound when native_rows < batch_size
    eager_us: float
    batch_size: int
    native_rows: int  # rows in the native steps timed: the batch, or fewer when stopped early
    threads: int
    measured: str  # UTC, ISO 8601
    load: float  # the 1-minute load average then

    def describe(self) -> str:
        """The figures as a job note says them."""
        if self.native_rows < self.batch_size:
            native_part = f"native over {self.native_us:,.0f} us/step (stopped at {self.native_rows} rows)"
        else:
            native_part = f"native {self.native_us:,.1f} us/step"
        return (
            f"{native_part}, eager {self.eager_us:,.1f} us/step at batch {self.batch_size} on "
            f"{self.threads} thread{'s' if self.threads != 1 else ''}, measured {self.measured} "
            f"at load {self.load:.1f}"
        )

    @classmethod
    def parse(cls, raw: Any) -> Figures | None:
        """An entry read from the file, or None when it is not a valid one."""
        try:
            figures = cls(
                loop=str(raw["loop"]),
                native_us=float(raw["native_us"]),
                eager_us=float(raw["eager_us"]),
                batch_size=int(raw["batch_size"]),
                native_rows=int(raw["native_rows"]),
                threads=int(raw["threads"]),
                measured=str(raw["measured"]),
                load=float(raw["load"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        times = (figures.native_us, figures.eager_us)
        if figures.loop not in ("native", "eager") or not all(math.isfinite(t) and t > 0 for t in times):
            return None
        return figures


@functools.cache
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def machine_key() -> dict[str, str]:
    """What a measurement depends on besides the shape. Raises NativeUnavailable without a compiler."""
    path = native.compiler()
    return {
        "compiler": path,
        "compiler_version": native.compiler_identity(path),
        "flags": " ".join(native.CFLAGS),
        "os": sys.platform,
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "torch": torch.__version__,
        # Not the intra-op threads: a job's count follows the machine's load, and a choice
        # keyed on it would let a busy day time a shape again and perhaps pick the other loop
        # (other bits). The first figures for a shape stand; they record their thread count.
    }


def calibration_file(key: dict[str, str] | None = None) -> Path:
    key = machine_key() if key is None else key
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return native.cache_dir() / f"crossover-{digest}.json"


def shape_key(source: str) -> str:
    """A shape's name in the file: its generated C names every width, the batch and the optimizer."""
    return hashlib.sha256(source.encode()).hexdigest()[:32]


def _read(path: Path, key: dict[str, str]) -> dict[str, Any]:
    """The file's entries, or none when it is missing, not ours, not valid or another machine's."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return {}
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            return {}
        try:
            data = json.loads(f.read(MAX_FILE_BYTES))
        except (OSError, ValueError):
            return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("machine") != key:
        return {}
    shapes = data.get("shapes")
    return shapes if isinstance(shapes, dict) else {}


def _write(path: Path, key: dict[str, str], shapes: dict[str, Any]) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".crossover-", delete=False) as f:
        json.dump({"format": FORMAT, "machine": key, "shapes": shapes}, f, indent=1, sort_keys=True)
    os.chmod(f.name, 0o600)
    os.replace(f.name, path)  # atomic: a reader sees the old file or the new one


@contextlib.contextmanager
def _locked(path: Path) -> Any:
    """One writer at a time across processes (workers may measure the same shape at once)."""
    fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def lookup(source: str) -> Figures | None:
    """The kept measurement for this shape on this machine, if any."""
    key = machine_key()
    path = calibration_file(key)
    native.own_folder(path.parent)
    try:
        return Figures.parse(_read(path, key).get(shape_key(source)))
    except OSError:  # read as if nothing were kept: the job measures and goes on
        return None


def record(source: str, figures: Figures) -> Figures:
    """Keep ``figures`` for this shape unless another process kept some first; the kept ones."""
    key = machine_key()
    path = calibration_file(key)
    native.own_folder(path.parent)
    name = shape_key(source)
    try:
        with _locked(path):
            shapes = _read(path, key)
            kept = Figures.parse(shapes.get(name))
            if kept is not None:
                return kept
            shapes = {k: v for k, v in shapes.items() if Figures.parse(v) is not None}
            shapes[name] = asdict(figures)
            _write(path, key, shapes)
    except OSError:
        # A full disk or a read-only cache: this job uses what it just measured, unkept (the
        # next job of the shape measures again); the training itself is not at stake.
        log.warning("could not keep the loop timing in %s; using it unkept", path, exc_info=True)
    return figures


def _clock() -> Callable[[], float]:
    """This thread's CPU time when torch runs on it alone (the native loop always does): on a
    busy machine, time spent waiting for a core is the other processes', not the loop's, and
    would only add noise. Wall time when torch has a pool of threads: their work counts."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def _seconds(steps: Steps, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, n_steps: int) -> float:
    loss_sum = torch.zeros((), dtype=torch.float32)
    clock = _clock()
    started = clock()
    steps.run(x, y, order, 0, n_steps, loss_sum)
    # Never zero: a coarse clock (thread_time on some systems) can read a tiny step as nothing.
    return max(clock() - started, 1e-9)


def measure(
    eager: Steps, fast: Steps, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, batch_size: int
) -> Figures:
    """Time ``eager`` and ``fast`` (the native steps) per step at ``batch_size`` on rows drawn
    from ``rows`` (indices into x and y, repeated as needed). Both change their own copies
    of the network only; nothing here draws random numbers."""
    bs = batch_size

    def order(n_rows: int) -> torch.Tensor:
        return rows[torch.arange(n_rows) % len(rows)]

    _seconds(eager, x, y, order(bs), 1)  # the optimizer's lazy state, autograd's first graph
    _seconds(fast, x, y, order(1), 1)  # the library's first call: page faults, lazy binding
    # Each figure is the fastest of two: one sample can land on another process's time slice.
    eager_s = min(_seconds(eager, x, y, order(bs), 1) for _ in range(2))
    eager_k = max(1, min(MAX_CHUNK_STEPS, math.ceil(CHUNK_S / eager_s)))
    # Native on growing partial batches (one step of m rows each): stop once clearly slower.
    m = 1
    while m < bs:
        native_s = min(_seconds(fast, x, y, order(m), 1) for _ in range(2))
        if native_s > CLEARLY_SLOWER * eager_s:
            return _figures("eager", native_s, eager_s, bs, m)
        m = min(bs, m * 4)
    native_s = _seconds(fast, x, y, order(bs), 1)
    native_k = max(1, min(MAX_CHUNK_STEPS, math.ceil(CHUNK_S / native_s)))
    eager_rounds: list[float] = []
    native_rounds: list[float] = []
    for _ in range(ROUNDS):
        eager_rounds.append(_seconds(eager, x, y, order(eager_k * bs), eager_k) / eager_k)
        native_rounds.append(_seconds(fast, x, y, order(native_k * bs), native_k) / native_k)
    eager_mid, native_mid = statistics.median(eager_rounds), statistics.median(native_rounds)
    return _figures("native" if native_mid < eager_mid else "eager", native_mid, eager_mid, bs, bs)


def _figures(loop: str, native_s: float, eager_s: float, batch_size: int, native_rows: int) -> Figures:
    return Figures(
        loop=loop,
        native_us=native_s * 1e6,
        eager_us=eager_s * 1e6,
        batch_size=batch_size,
        native_rows=native_rows,
        threads=torch.get_num_threads(),
        measured=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        load=os.getloadavg()[0],
    )
