"""Serving: load trained models (checked, cached), validate inputs, predict under inference_mode.

torch, and the modules built on it, are imported where a model is loaded or run, not at the
top: the API process imports this module to validate requests and hold its caches, and it
answers before it has loaded torch (``Warmup``, started once the app has started, loads it
for the first model; docs/performance-16.md, target 7).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from trainserve.db import ModelRecord
from trainserve.errors import InvalidInput, NativeUnavailable, NotFound, PayloadTooLarge
from trainserve.storage.base import Store
from trainserve.training import threads
from trainserve.training.features import ColumnPlan, FeaturePlan, level_index
from trainserve.training.spec import TrainSpec

if TYPE_CHECKING:
    import torch

    from trainserve.training.native import RowwiseForward
    from trainserve.training.network import TabularNet

log = logging.getLogger(__name__)

# A forward pass smaller than this many parameter-rows (about as many multiply-adds,
# well under a millisecond) runs on the event loop: handing it to a thread would cost more.
INLINE_WORK = 4_000_000
# Requests up to this many parameter-rows go through the row-wise generated forward pass
# (about 6 us for one row of the guide's MLP, against torch's 30 us); above it, torch's
# matrix kernels are faster (measured: 256 rows of the guide's MLP, 260 us against 80 us).
ROWWISE_WORK = 1 << 18
# TRAINSERVE_PREDICT_THREADS, when set (``configure_threads``); else each pass through
# torch's kernels gets the threads its size and the cores free allow (training/threads.py):
# a 65,536-row pass split over two threads is 2.7x faster when both cores are free, and
# 20x slower when another program keeps one of them busy.
_threads_override: int | None = None


def configure_threads(override: int | None) -> None:
    global _threads_override
    _threads_override = override


class Warmup:
    """Loads torch and what runs a model, in a background thread, once the API has started.

    The API answers (``/healthz``, uploads, jobs, the dashboard) before torch is loaded: about
    a second of CPU that only models need. The first prediction that arrives before the
    warm-up ends waits for it on Python's import lock, then runs as usual. ``state`` is what
    ``/readyz`` reports under ``models``: "loading" (not ready) until then, so that a load
    balancer sends predictions only once they run at full speed.
    """

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: str | None = None

    def start(self, threads_override: int | None) -> None:
        threading.Thread(target=self._run, args=(threads_override,), name="trainserve-warm-up", daemon=True).start()

    def _run(self, threads_override: int | None) -> None:
        # Torch's import makes some 300,000 objects that live as long as the process: no
        # cyclic collection while it runs (each walked them all and freed nothing), then
        # frozen out of the collector's full passes with everything the start built. Cyclic
        # garbage that requests leave in this second is frozen with it and never freed: a
        # bounded cost, where a collection before the freeze would walk torch's objects.
        gc.disable()
        try:
            import safetensors.torch  # noqa: F401 (each model's weights are read with it)
            import torch

            from trainserve.training import native, network  # noqa: F401 (loaded for the first model)

            if threads_override is not None:  # this process only predicts; see config
                torch.set_num_threads(threads_override)
        except Exception as exc:  # reported by /readyz; a prediction meets the same error itself
            log.exception("could not load torch")
            self._error = f"error: {exc}"
        finally:
            gc.freeze()
            gc.enable()
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def state(self) -> str:
        if not self._done.is_set():
            return "loading"
        return self._error or "ok"


@dataclass(frozen=True)
class Outcome:
    """A forward pass's answer as arrays: predictions (labels or values), probabilities for classifiers."""

    predictions: np.ndarray
    probabilities: np.ndarray | None

    def rows(self, start: int, stop: int) -> Outcome:
        probabilities = None if self.probabilities is None else self.probabilities[start:stop]
        return Outcome(self.predictions[start:stop], probabilities)


@dataclass
class Predictor:
    """A trained model ready to answer: eval mode, on the CPU, with its labels. Everything
    here is immutable once trained, so it can be cached for as long as the model exists."""

    model_id: str
    features: list[str]
    targets: list[str]
    task: str
    classes: list[Any] | None
    module: TabularNet
    name: str | None = None
    version: int | None = None
    n_parameters: int = 0
    # The forward pass as generated code, row by row (trainserve.training.native); None where the
    # architecture or the machine (no C compiler) cannot have one.
    rowwise: RowwiseForward | None = field(default=None, repr=False)
    # How columns become features (training.features); None for a model that takes numbers as
    # they are: a clean numeric table, or a model from before preprocessing existed.
    preprocessing: FeaturePlan | None = None
    # Columns of the training table the model does not use (training.features.FeaturePlan.ignored).
    ignored: tuple[str, ...] = ()
    # What a JSON row keyed by name may carry besides the features, disregarded: the ignored
    # columns and the targets (a CSV's extra columns are accepted, and echoed, too).
    disregarded: frozenset[str] = field(default=frozenset(), init=False, repr=False)
    _labels: np.ndarray | None = field(default=None, repr=False)
    # Which model answered, for every answer's headers: built once, not per request.
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    _steps: list[Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.classes is not None:
            self._labels = np.asarray(self.classes)
        self.disregarded = frozenset(self.ignored).union(self.targets).difference(self.features)
        if not self.n_parameters:
            self.n_parameters = sum(p.numel() for p in self.module.parameters())
        self.headers = {"X-Model-Id": self.model_id}
        if self.version is not None:
            self.headers["X-Model-Version"] = str(self.version)
        # The scaler and each layer's own forward, in order: the same computation as
        # module(x) without nn.Module.__call__'s hook machinery, about a quarter of a
        # one-row prediction's time for the guide's MLP. (No hooks are ever registered.)
        self._steps = [self.module.scaler.forward, *(layer.forward for layer in self.module.net)]
        if self.module.embeddings is not None:
            self._steps.insert(0, self.module.embeddings.forward)
        if self.module.encoder is not None:
            self._steps.insert(0, self.module.encoder.forward)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Raw layout -> what the scaler takes: encoded, categories embedded; x itself for a
        model without preprocessing."""
        if self.module.encoder is None:
            return x
        import torch

        with torch.inference_mode():
            encoded = self.module.encoder(torch.from_numpy(np.ascontiguousarray(x)))
            if self.module.embeddings is not None:
                encoded = self.module.embeddings(encoded)
            result: np.ndarray = encoded.numpy()
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self._steps:
            x = step(x)
        return x

    @classmethod
    def load(cls, store: Store, record: ModelRecord) -> Predictor:
        from trainserve.training.native import RowwiseForward
        from trainserve.training.network import FeatureEncoder, TabularNet

        tensors = store.load_weights(record.id, record.weights_sha256)
        spec = TrainSpec.model_validate(record.spec)
        stored = getattr(record, "preprocessing", None)  # absent from records made by hand (tests, tools)
        plan = FeaturePlan.from_json(stored) if stored else None
        preprocessing = plan if plan is not None and not plan.is_identity else None
        encoder = FeatureEncoder(preprocessing) if preprocessing is not None else None
        width = preprocessing.net_width if preprocessing is not None else len(record.features)
        embeddings = preprocessing.embeddings if preprocessing is not None else None
        module = TabularNet(spec.model, width, encoder, embeddings or None)
        module.load_state_dict(tensors)
        module.eval()
        rowwise = None
        try:
            rowwise = RowwiseForward(module, spec.model, width, record.task)
        except NativeUnavailable as exc:
            log.info("model %s is served by PyTorch alone, without micro-batching: %s", record.id, exc)
        return cls(
            record.id,
            record.features,
            record.targets,
            record.task,
            record.classes,
            module,
            name=record.name,
            version=record.version,
            rowwise=rowwise,
            preprocessing=preprocessing,
            ignored=tuple(plan.ignored) if plan is not None else (),
        )

    def runs_inline(self, n_rows: int) -> bool:
        """Cheap enough to run on the event loop rather than in a thread."""
        return n_rows * max(self.n_parameters, 1) <= INLINE_WORK

    def takes_rowwise(self, n_rows: int) -> bool:
        """Whether ``n_rows`` rows go through the row-wise forward pass (see ``infer``)."""
        return self.rowwise is not None and n_rows * max(self.n_parameters, 1) <= ROWWISE_WORK

    def infer(self, x: np.ndarray, *, probabilities: bool = True) -> Outcome:
        """One forward pass over a float32 matrix, answered as arrays.

        A request small enough for the row-wise pass gets the very answer it would get in
        any micro-batch (trainserve.serving.batching), so its answer never depends on other traffic;
        larger ones go to torch's matrix kernels. Either way, the answer depends only on
        the request itself. ``probabilities=False``: a large classifier request that wants
        labels only skips them (labels then come from the logits, the same argmax)."""
        if self.takes_rowwise(len(x)):
            return self.infer_rowwise(x)
        work = len(x) * max(self.n_parameters, 1)
        threads.apply(_threads_override or threads.choose(work, wait=None).threads)
        import torch

        from trainserve.training.network import outputs_to_probabilities

        with torch.inference_mode():
            outputs = self.forward(torch.from_numpy(x))
            if self.task == "regression":
                return _regressed(outputs.numpy())
            if not probabilities:
                index = (outputs[:, 0] > 0).long() if self.task == "binary" else outputs.argmax(dim=1)
                assert self._labels is not None
                return Outcome(self._labels[index.numpy()], None)
            class_probabilities = outputs_to_probabilities(outputs, self.task)  # type: ignore[arg-type]
            # torch's argmax: numpy's over a narrow last axis took twice as long (65,536 rows).
            return self._classified(class_probabilities.numpy(), class_probabilities.argmax(dim=1).numpy())

    def infer_rowwise(self, x: np.ndarray) -> Outcome:
        """The row-wise generated forward pass: each row's answer independent of the others."""
        assert self.rowwise is not None
        outputs = self.rowwise(np.ascontiguousarray(self.encode(x)))  # the row-wise pass takes C-ordered rows only
        if self.task == "regression":
            return _regressed(outputs)
        return self._classified(outputs, outputs.argmax(axis=1))

    def _classified(self, probabilities: np.ndarray, index: np.ndarray) -> Outcome:
        assert self._labels is not None
        return Outcome(self._labels[index], probabilities)


def _regressed(values: np.ndarray) -> Outcome:
    """A regression's outputs as its answer: one value per row for a single target."""
    return Outcome(values[:, 0] if values.shape[1] == 1 else values, None)


class ModelCache:
    """Least-recently-used models in memory, by id, so that a prediction for a cached model
    touches no database and no file.

    Weights and metadata never change once written, so an entry only goes stale when its
    model is deleted. A delete in this process evicts at once; one in another process
    (a second API replica) is noticed once an entry is ``revalidate_s`` old: ``lookup()``
    then sends one caller to check the database, which ``confirm()``s or ``evict()``s it;
    a deleted model keeps answering elsewhere for at most that long plus one query.
    """

    def __init__(self, store: Store, capacity: int, *, revalidate_s: float = 1.0) -> None:
        self.store, self.capacity, self.revalidate_s = store, capacity, revalidate_s
        self._entries: OrderedDict[str, tuple[Predictor, float]] = OrderedDict()
        self._lock = threading.Lock()
        # Bumped by every evict: a load that started before a delete must not cache its result.
        self._generation = 0
        self._checking: set[str] = set()  # ids a caller is re-checking against the database

    def lookup(self, model_id: str) -> Predictor | None:
        """The cached model, or None: it is not cached, or it is due a re-check that this
        caller must make (by loading it, which confirms or evicts it), then call
        ``checked()``. While one caller re-checks, the others keep getting the cached model:
        a re-check costs one request one query, instead of sending every request that
        arrives meanwhile to the database (measured: p99 latency at 32 clients 4x worse)."""
        entry = self._entries.get(model_id)
        if entry is None:
            return None
        with self._lock:
            if time.monotonic() - entry[1] > self.revalidate_s and model_id not in self._checking:
                self._checking.add(model_id)
                return None
            if model_id in self._entries:
                self._entries.move_to_end(model_id)
        return entry[0]

    def checked(self, model_id: str) -> None:
        """The re-check that ``lookup`` asked for is over, whatever it found."""
        with self._lock:
            self._checking.discard(model_id)

    def cached(self, model_id: str) -> Predictor | None:
        """The cached model, fresh or not (the caller has just checked that it exists)."""
        entry = self._entries.get(model_id)
        return None if entry is None else entry[0]

    def confirm(self, model_id: str) -> None:
        """The model was seen in the database just now: fresh for another revalidate_s."""
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is not None:
                self._entries[model_id] = (entry[0], time.monotonic())

    def generation(self) -> int:
        return self._generation

    def get(self, record: ModelRecord, *, generation: int | None = None) -> Predictor:
        """The loaded model; NotFound if its weights were deleted since the row was read.
        ``generation``: the cache's generation before ``record`` was read."""
        predictor = self.cached(record.id)
        if predictor is not None:
            self.confirm(record.id)
            return predictor
        start = self._generation if generation is None else generation
        try:
            predictor = Predictor.load(self.store, record)  # outside the lock: loads may overlap
        except FileNotFoundError:
            raise NotFound(f"model {record.id!r} does not exist") from None
        with self._lock:
            if self._generation == start:  # else a delete ran meanwhile: answer, but don't keep it
                self._entries[record.id] = (predictor, time.monotonic())
                self._entries.move_to_end(record.id)
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        return predictor

    def evict(self, model_id: str) -> None:
        with self._lock:
            self._generation += 1
            self._entries.pop(model_id, None)

    def __len__(self) -> int:
        return len(self._entries)


NameKey = tuple[str, str | None, int | None]  # (name, alias, version) as a request named the model


class NameCache:
    """Which model id a name (+ alias or version) stood for when last looked up, so that a
    prediction by name for a cached model touches no database, like one by id.

    An alias moved, or a version added, in another API process is noticed once an entry is
    ``revalidate_s`` old: ``lookup()`` then sends one caller to resolve the name again in
    the database (and ``remember()`` the answer), while the others keep the id they had;
    a move in this process ``forget()``s the name at once.
    """

    def __init__(self, revalidate_s: float = 1.0, capacity: int = 4096) -> None:
        self.revalidate_s, self.capacity = revalidate_s, capacity
        self._entries: dict[NameKey, tuple[str, float]] = {}
        self._checking: set[NameKey] = set()
        self._lock = threading.Lock()
        self._generation = 0  # bumped by forget: a lookup that began before must not be kept

    def lookup(self, key: NameKey) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if time.monotonic() - entry[1] > self.revalidate_s:
            with self._lock:
                if key not in self._checking:
                    self._checking.add(key)
                    return None
        return entry[0]

    def generation(self) -> int:
        return self._generation

    def remember(self, key: NameKey, model_id: str, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return
            if len(self._entries) >= self.capacity and key not in self._entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = (model_id, time.monotonic())

    def checked(self, key: NameKey) -> None:
        with self._lock:
            self._checking.discard(key)

    def forget(self, name: str) -> None:
        with self._lock:
            self._generation += 1
            for key in [k for k in self._entries if k[0] == name]:
                del self._entries[key]


# -- input validation ------------------------------------------------------------------------


def _bad(msg: str, loc: list[Any]) -> InvalidInput:
    return InvalidInput(msg, errors=[{"loc": ["inputs", *loc], "msg": msg}])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _explain(rows: list[Any], width: int) -> InvalidInput:
    """Find the first value numpy could not take, to name its row and column (slow path)."""
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            return _bad(f"inputs[{i}] must be a list of {width} numbers or an object keyed by feature", [i])
        if len(row) != width:
            return _bad(f"inputs[{i}] has {len(row)} values, the model takes {width}", [i])
        for j, value in enumerate(row):
            if not _is_number(value):
                return _bad(f"inputs[{i}][{j}]: {value!r} is not a number", [i, j])
            if not _fits_float(value):
                return _bad(f"inputs[{i}][{j}]: the number is too large", [i, j])
    return _bad("inputs must be rows of numbers", [])


def _fits_float(value: int | float) -> bool:
    try:
        float(value)
    except OverflowError:  # an int beyond float64
        return False
    return True


def _objects_to_rows(rows: list[Any], features: list[str], disregarded: frozenset[str]) -> list[list[Any]]:
    """Objects -> lists in feature order. Keys in ``disregarded`` (columns the model knows and
    does not use) are dropped; any other key that is not a feature is refused: a client that
    misspells a feature must not be answered as if the feature were blank."""
    wanted = set(features)
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise _bad(f"inputs[{i}] must be an object keyed by feature name, like inputs[0]", [i])
        # Exactly the features (the usual row), or the features and disregarded keys (a whole
        # row sent back): two set comparisons, with the slow search for a culprit only on error.
        if (len(row) != len(features) or not wanted.issuperset(row)) and not (
            row.keys() >= wanted and row.keys() - wanted <= disregarded
        ):
            unknown = sorted(set(row) - wanted - disregarded)
            if unknown:
                names = sorted(disregarded)
                shown = names if len(names) <= 20 else [*names[:20], f"... {len(names) - 20} more"]
                also = f"; it disregards {shown}" if disregarded else ""
                msg = f"inputs[{i}]: unknown feature {unknown[0]!r} (the model takes {features}{also})"
                raise _bad(msg, [i, unknown[0]])
            missing = [f for f in features if f not in row]
            if missing:
                raise _bad(f"inputs[{i}]: feature {missing[0]!r} is missing", [i, missing[0]])
        out.append([row[f] for f in features])
    return out


def _request_rows(
    inputs: list[Any], features: list[str], *, max_rows: int, disregarded: frozenset[str] = frozenset()
) -> list[Any]:
    """The request's rows, objects keyed by feature turned into lists in feature order;
    an empty or oversized request refused."""
    if not inputs:
        raise _bad("inputs is empty: send at least one row", [])
    if len(inputs) > max_rows:
        raise PayloadTooLarge(f"{len(inputs)} rows in one request, the limit is {max_rows}")
    return _objects_to_rows(inputs, features, disregarded) if isinstance(inputs[0], dict) else inputs


def inputs_to_matrix(
    inputs: list[Any],
    features: list[str],
    *,
    max_rows: int,
    may_hold_booleans: bool = True,
    disregarded: frozenset[str] = frozenset(),
) -> np.ndarray:
    """Rows (lists, or objects keyed by feature name) -> float32 matrix, or an error naming the cell.

    ``may_hold_booleans=False``: the caller saw no ``true``/``false`` in the raw JSON, so
    the one check numpy cannot do (a boolean beside numbers reads as 0 or 1) is skipped.
    ``disregarded``: keys an object may carry besides the features (``Predictor.disregarded``).
    """
    rows = _request_rows(inputs, features, max_rows=max_rows, disregarded=disregarded)
    width = len(features)
    if len(rows) <= _SMALL_ROWS:
        matrix = _small_matrix(rows, width)
        if matrix is not None:
            return matrix
    try:
        matrix = np.array(rows)
    except ValueError:  # ragged
        raise _explain(rows, width) from None
    if matrix.dtype == object and matrix.ndim == 2:  # ints beyond int64, or a null among numbers
        if not all(_is_number(value) for row in rows for value in row):
            raise _explain(rows, width)  # astype would read None as NaN
        try:
            matrix = matrix.astype(np.float64)
        except (TypeError, ValueError, OverflowError):
            raise _explain(rows, width) from None
    if matrix.dtype.kind not in "iuf" or matrix.ndim != 2 or matrix.shape[1] != width:
        raise _explain(rows, width)
    if may_hold_booleans and any(type(value) is bool for row in rows for value in row):
        raise _explain(rows, width)  # numpy reads True as 1 beside numbers
    with np.errstate(over="ignore"):  # too large for float32 becomes inf, reported just below
        matrix = matrix.astype(np.float32)
    return check_finite(matrix, lambda i, j: rows[i][j])


# A few rows are checked faster in Python than by the several numpy calls below (each
# costs microseconds when the CPU caches are cold, as they are between requests).
_SMALL_ROWS = 16
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _small_matrix(rows: list[Any], width: int) -> np.ndarray | None:
    """The float32 matrix if every row is a list of ``width`` finite numbers that fit float32;
    None otherwise (the general path then names the problem)."""
    for row in rows:
        if type(row) is not list or len(row) != width:
            return None
        for value in row:
            kind = type(value)
            # bool is not int here (type, not isinstance); NaN fails every comparison.
            if (kind is not float and kind is not int) or not -_FLOAT32_MAX <= value <= _FLOAT32_MAX:
                return None
    return np.array(rows, dtype=np.float32)


def check_finite(matrix: np.ndarray, original: Any = None, *, from_file: bool = False) -> np.ndarray:
    """The matrix, or an error naming its first NaN/infinite cell (``original(i, j)``: the value as sent).

    The house convention names the cell: ``inputs[i][j]`` (0-based, as JSON and the error's
    ``loc`` do) for a JSON body, "row N, column j" (data rows from 1) for a file (``from_file``).
    """
    if np.isfinite(matrix).all():
        return matrix
    i, j = (int(v) for v in np.argwhere(~np.isfinite(matrix))[0])
    value = original(i, j) if original is not None else matrix[i, j]
    if from_file:
        msg = f"row {i + 1}, column {j}: {_not_finite(value)}"
        raise InvalidInput(msg, errors=[{"loc": ["body", i + 1, j], "msg": msg}])
    raise _bad(f"inputs[{i}][{j}]: {_not_finite(value)}", [i, j])


def _not_finite(value: Any) -> str:
    """Why a value that became NaN or infinite in float32 cannot be used."""
    if _is_number(value) and _fits_float(value) and np.isfinite(float(value)):
        return f"{value} is out of float32 range (at most about ±3.4e38)"
    return f"{value} is not a finite number"


# -- inputs for a model with preprocessing: text categories and blanks ---------------------------


@dataclass(frozen=True)
class RawRows:
    """Rows in a preprocessed model's raw layout (training.features), and what was answered anyway."""

    matrix: np.ndarray
    warnings: list[dict[str, Any]]


_NUMBER_TYPES: frozenset[type] = frozenset({int, float, type(None)})
_TEXT_TYPES: frozenset[type] = frozenset({str, type(None)})


def _first_of_type(values: tuple[Any, ...], allowed: frozenset[type]) -> int:
    return next(i for i, v in enumerate(values) if type(v) not in allowed)


def column_to_raw(
    column: ColumnPlan, values: np.ndarray, blank: np.ndarray, where: Callable[[int], tuple[Any, list[Any]]]
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One feature's cells -> its raw-layout column and the warnings it earns.

    ``values``: a category's cells as text ("" blank), or a number column's as float64 (NaN
    blank); ``blank``: which cells were missing; ``where(i)``: how row i is named in
    warnings and errors (its number and the error's loc prefix)."""
    warnings: list[dict[str, Any]] = []
    if column.kind == "category":
        codes, unseen = level_index(column, values)
        for i in np.flatnonzero(unseen).tolist():
            row, _ = where(i)
            message = "a category never seen in training: answered as the unknown level"
            warnings.append({"row": row, "column": column.name, "value": values[i].item(), "message": message})
        answered_blank = blank & np.isnan(codes) & (not column.blank_level)
    else:
        codes = values.astype(np.float32)
        answered_blank = blank & (not column.indicator)
    if column.missing == "error" and blank.any():
        row, loc = where(int(np.flatnonzero(blank)[0]))
        msg = f"{row}, column {column.name!r} is blank; this model was trained to refuse blanks there"
        raise InvalidInput(msg, errors=[{"loc": [*loc, column.name], "msg": msg}])
    for i in np.flatnonzero(answered_blank).tolist():
        row, _ = where(i)
        if column.kind == "category":
            message = "blank, and training had no blanks here: answered as the unknown level"
        else:
            message = f"blank, and training had no blanks here: filled with {column.fill_value:g}"
        warnings.append({"row": row, "column": column.name, "value": None, "message": message})
    return codes, warnings


def inputs_to_raw(
    inputs: list[Any], plan: FeaturePlan, *, max_rows: int, disregarded: frozenset[str] = frozenset()
) -> RawRows:
    """JSON rows (lists in feature order, or objects keyed by feature) with strings for
    categories and null for blanks -> the raw layout, category levels looked up with numpy."""
    features = plan.features
    rows = _request_rows(inputs, features, max_rows=max_rows, disregarded=disregarded)
    width = len(features)
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != width:
            raise _bad(f"inputs[{i}] must be a list of {width} values in feature order ({features}), or an object", [i])
    cells = list(zip(*rows, strict=True))
    matrix = np.empty((len(rows), width), dtype=np.float32)
    warnings: list[dict[str, Any]] = []

    def where(i: int) -> tuple[Any, list[Any]]:
        return i, ["inputs", i]

    for j, column in enumerate(plan.columns):
        values = cells[j]
        text = column.kind == "category" and column.level_type == "text"
        allowed = _TEXT_TYPES if text else _NUMBER_TYPES
        if not allowed.issuperset(map(type, values)):
            i = _first_of_type(values, allowed)
            what = "a string (a category label) or null" if text else "a number or null"
            raise _bad(f"inputs[{i}], column {column.name!r}: {values[i]!r} is not {what}", [i, column.name])
        objects = np.array(values, dtype=object)
        blank = np.array([v is None for v in values], dtype=bool)
        if text:
            column_values = np.where(blank, "", objects).astype(np.str_)
            blank |= column_values == ""
        else:
            try:
                column_values = np.where(blank, 0.0, objects).astype(np.float64)
            except OverflowError:
                i = next(k for k, v in enumerate(values) if v is not None and not _fits_float(v))
                raise _bad(f"inputs[{i}], column {column.name!r}: the number is too large", [i, column.name]) from None
            bad = np.flatnonzero(~np.isfinite(column_values) | (np.abs(column_values) > _FLOAT32_MAX))
            if len(bad):
                i = int(bad[0])
                raise _bad(f"inputs[{i}], column {column.name!r}: {_not_finite(values[i])}", [i, column.name])
            column_values[blank] = np.nan
        matrix[:, j], found = column_to_raw(column, column_values, blank, where)
        warnings += found
    return RawRows(matrix, warnings)
