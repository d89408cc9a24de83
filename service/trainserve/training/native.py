"""The whole training step as generated C: many steps per call, for small batches on CPU.

With the guide's per-sample SGD, an eager PyTorch step spends nearly all its time in
per-operation overhead (dispatch, autograd bookkeeping, optimizer loops), not in
arithmetic. So for a spec built from supported pieces, this module writes one C function
that runs a range of steps (forward, loss, backward, optional clipping, optimizer update)
over the epoch's rows, compiles it with the system C compiler, caches the shared library
on disk under a hash of its source, its compiler and its machine, and calls it through
ctypes on the very tensors the module and the torch optimizer own. The weights and
optimizer state therefore never leave torch's own storage: evaluation, checkpoints and
saving see them as usual, and a checkpoint taken between two calls resumes bit for bit.
Why not ``torch.compile``, the error budget, and when to delete this: docs/native.md.

The kernels (``linear_forward``, ``tanh_backward``, ``adam_update``, ...) are readable C
checked in beside this file (native_kernels.c); this module writes only the sequence of
calls and sizes for one spec, and the ABI record those sizes make. The record is compiled
into the library (``train_abi_*``, ``forward_abi_*``), compared with Python's own copy when
the library is loaded, and every call checks each tensor it hands over against it (shape,
dtype, contiguity, device) and re-reads their pointers: a caller's mistake raises
:class:`AbiMismatch` instead of corrupting memory in the worker or the API process.

The generated code mirrors torch's formulas (including each optimizer's update and state
layout) in float32, so it is the same algorithm; sums run in another order than torch's
kernels, so results match eager training to rounding, not bit for bit.

The same machinery writes the serving side's row-wise forward pass (:class:`RowwiseForward`):
each row computed on its own, in a fixed order, so a row's answer never depends on which
other rows share the call, which is what lets the API micro-batch concurrent requests
without their answers changing (torch's matrix kernels round differently for 1 row and 2).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainserve.config import Settings
from trainserve.errors import NativeUnavailable
from trainserve.training import spec as S

ACTIVATIONS = frozenset({"Tanh", "ReLU", "Sigmoid", "GELU", "SiLU", "Mish", "ELU", "LeakyReLU", "Softplus", "Identity"})
CHUNK_STEPS = 1024  # steps per call; checkpoints and cancel checks fall between calls
# -ffp-contract=off: no fused a*b+c, which clang does by default and gcc does not; without it
# two replicas built by different compilers disagree in the last bits. No -ffast-math ever.
CFLAGS = ("-O3", "-std=c99", "-fPIC", "-fno-math-errno", "-ffp-contract=off")
_LINK = ("-shared",)
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}

# The optimizer state each torch optimizer keeps per parameter, in the order the generated
# code takes it (tests/training/test_native.py pins this against torch's own state dicts).
STATE_SLOTS: dict[str, tuple[str, ...]] = {
    "SGD": (),  # + momentum_buffer with momentum
    "Adam": ("step", "exp_avg", "exp_avg_sq"),  # + max_exp_avg_sq with amsgrad
    "AdamW": ("step", "exp_avg", "exp_avg_sq"),
    "RMSprop": ("step", "square_avg"),  # + momentum_buffer with momentum, + grad_avg when centered
    "Adagrad": ("step", "sum"),
}

# Return codes of the generated functions (TS_* in native_kernels.c).
_TS_ERRORS = {
    1: "the native code could not allocate its workspace",
    2: "a row index is outside the data",
    3: "a class label is outside [0, classes)",
}


class AbiMismatch(ValueError):
    """A tensor handed to generated code does not match its ABI record: a programming
    error in the caller, raised before any pointer crosses into C."""


_settings: tuple[Any, Settings] | None = None


def native_settings() -> Settings:
    """The native path's settings, read afresh whenever the ``TRAINSERVE_*`` environment or
    the .env file changed (tests and processes set them by environment). Kept otherwise:
    building Settings takes about 15 ms, and a job reads them several times."""
    global _settings
    env_file: tuple[int, int] | None = None
    with contextlib.suppress(OSError):
        info = os.stat(".env")
        env_file = (info.st_mtime_ns, info.st_size)
    environment = sorted((k, v) for k, v in os.environ.items() if k.upper().startswith("TRAINSERVE_"))
    key = (tuple(environment), os.getcwd(), env_file)
    if _settings is None or _settings[0] != key:
        _settings = (key, Settings())
    return _settings[1]


def cache_dir() -> Path:
    """Where compiled step functions are kept between runs and processes."""
    configured = native_settings().native_cache_dir
    if configured is not None:
        return configured
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainserve" / "native"


def unsupported_reason(spec: S.TrainSpec, device: torch.device) -> str | None:
    """Why this spec runs eagerly whatever the timing, or None when generated code can run it
    (whether it should is measured: training/crossover.py)."""
    if spec.loop == "eager":
        return "the spec's loop is eager"
    if not native_settings().native:
        return "the native path is off on this worker (TRAINSERVE_NATIVE=false)"
    if device.type != "cpu":
        return f"generated code runs on CPU; this run is on {device.type}"
    if spec.autocast is not None:
        return "autocast runs in eager PyTorch"
    if getattr(spec.loss, "weight", None) is not None or getattr(spec.loss, "pos_weight", None) is not None:
        return "class weights run in eager PyTorch"
    for layer in spec.model:
        if not isinstance(layer, S.Linear) and layer.type not in ACTIVATIONS:
            return f"{layer.type} runs in eager PyTorch"
    return None


# -- the ABI record ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Abi:
    """What a generated function expects of the tensors it is handed, written into its
    library as C constants (``<kind>_abi_*``) and checked on the Python side at every call."""

    kind: str  # "train" (train_steps) or "forward" (forward_rows)
    in_features: int
    widths: tuple[int, ...]  # into the first layer, then out of each layer
    param_shapes: tuple[tuple[int, ...], ...]  # in net.parameters() order
    slots: tuple[str, ...] = ()  # optimizer state per parameter, in order ("step" is a scalar)
    y_dtype: str = ""  # "int64" (class indices) or "float32" (targets); "" for forward_rows
    y_width: int = 0
    batch_size: int = 0  # the fixed batch of train_steps; 0 for forward_rows
    out_width: int = 0  # the width of forward_rows' output rows; the logits' for train_steps

    def slot_shape(self, slot: str, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        return () if slot == "step" else param_shape

    def c_record(self) -> str:
        k = self.kind
        sizes = [int(np.prod(s)) for s in self.param_shapes]
        scalar = [int(s == "step") for s in self.slots]
        lines = [
            "/* ABI record: checked by native.py when loaded and at every call */",
            f"const long {k}_abi_in_features = {self.in_features};",
            f"const long {k}_abi_n_widths = {len(self.widths)};",
            f"const long {k}_abi_widths[] = {{{', '.join(map(str, self.widths))}}};",
            f"const long {k}_abi_batch_size = {self.batch_size};",
            f"const long {k}_abi_out_width = {self.out_width};",
            f"const long {k}_abi_y_width = {self.y_width};",
            f"const long {k}_abi_y_is_int64 = {int(self.y_dtype == 'int64')};",
            f"const long {k}_abi_n_params = {len(sizes)};",
            f"const long {k}_abi_param_sizes[] = {{{', '.join(map(str, sizes)) or '0'}}};",
            f"const long {k}_abi_n_slots = {len(self.slots)};",
            f"const long {k}_abi_slot_is_scalar[] = {{{', '.join(map(str, scalar)) or '0'}}};",
        ]
        return "\n".join(lines) + "\n"

    def check_library(self, library: ctypes.CDLL) -> None:
        """The library's compiled record is this one (a stale or foreign library is refused)."""
        k, long = self.kind, ctypes.c_long

        def number(name: str) -> int:
            return long.in_dll(library, f"{k}_abi_{name}").value

        try:
            n_params, n_slots, n_widths = number("n_params"), number("n_slots"), number("n_widths")
            found = (
                number("in_features"),
                list((long * max(n_widths, 1)).in_dll(library, f"{k}_abi_widths"))[:n_widths],
                number("batch_size"),
                number("out_width"),
                number("y_width"),
                number("y_is_int64"),
                list((long * max(n_params, 1)).in_dll(library, f"{k}_abi_param_sizes"))[:n_params],
                list((long * max(n_slots, 1)).in_dll(library, f"{k}_abi_slot_is_scalar"))[:n_slots],
            )
        except ValueError as exc:  # a symbol missing
            raise NativeUnavailable(f"the compiled library has no ABI record: {exc}") from None
        expected = (
            self.in_features,
            list(self.widths),
            self.batch_size,
            self.out_width,
            self.y_width,
            int(self.y_dtype == "int64"),
            [int(np.prod(s)) for s in self.param_shapes],
            [int(s == "step") for s in self.slots],
        )
        if found != expected:
            raise NativeUnavailable(f"the compiled library's ABI record {found} is not the expected {expected}")


def _check_tensor(what: str, t: Any, shape: tuple[int, ...] | None, dtype: torch.dtype) -> None:
    # One cheap test for the usual case (a serving call checks eight or so tensors); the
    # detailed ones below only name what is wrong.
    if (
        isinstance(t, torch.Tensor)
        and t.dtype == dtype
        and (shape is None or t.shape == shape)
        and t.is_cpu
        and t.is_contiguous()
    ):
        return
    if not isinstance(t, torch.Tensor):
        raise AbiMismatch(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise AbiMismatch(f"{what}: dtype {t.dtype}, the generated code needs {dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise AbiMismatch(f"{what}: shape {tuple(t.shape)}, the generated code needs {shape}")
    if t.device.type != "cpu":
        raise AbiMismatch(f"{what}: on {t.device}, the generated code runs on the CPU")
    if not t.is_contiguous():
        raise AbiMismatch(f"{what}: not contiguous")


def _check_array(what: str, a: Any, shape: tuple[int, ...] | None) -> None:
    if isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == shape and a.flags.c_contiguous:
        return
    if not isinstance(a, np.ndarray):
        raise AbiMismatch(f"{what}: expected a numpy array, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise AbiMismatch(f"{what}: dtype {a.dtype}, the generated code needs float32")
    if shape is not None and a.shape != shape:
        raise AbiMismatch(f"{what}: shape {a.shape}, the generated code needs {shape}")
    if not a.flags.c_contiguous:
        raise AbiMismatch(f"{what}: not C-contiguous")


# -- code generation -------------------------------------------------------------------------------


@functools.cache
def kernels_source() -> str:
    """native_kernels.c, shipped as package data: the top of every generated unit."""
    return resources.files("trainserve.training").joinpath("native_kernels.c").read_text(encoding="utf-8")


def _f(value: float) -> str:
    """A C float literal that round-trips the Python float through float32 as torch does."""
    text = f"{float(torch.tensor(value, dtype=torch.float32)):.9g}"
    return f"{text}f" if any(c in text for c in ".en") else f"{text}.0f"


def _d(value: float) -> str:
    return f"{float(value):.17g}"


def _activation_kernel(layer: Any) -> tuple[str, str]:
    """(kernel name, extra arguments after N) for an activation layer."""
    kind = layer.type
    if kind == "ELU":
        return "elu", f", {_f(layer.alpha)}"
    if kind == "LeakyReLU":
        return "leaky_relu", f", {_f(layer.negative_slope)}"
    if kind == "Softplus":
        return "softplus", f", {_f(layer.beta)}, {_f(layer.threshold)}"
    if kind == "GELU":
        return ("gelu_tanh" if layer.approximate == "tanh" else "gelu"), ""
    names = {"Tanh": "tanh", "ReLU": "relu", "Sigmoid": "sigmoid", "SiLU": "silu", "Mish": "mish"}
    names |= {"Identity": "identity", "Dropout": "identity"}
    return names[kind], ""


def layer_widths(layers: list[Any], in_features: int) -> list[int]:
    """The width of the data into the first layer and out of each layer."""
    widths = [in_features]
    for layer in layers:
        widths.append(layer.out_features if isinstance(layer, S.Linear) else widths[-1])
    return widths


def state_slots(optimizer: S.Optimizer) -> tuple[str, ...]:
    """The optimizer state slots per parameter that the generated update reads and writes."""
    slots = list(STATE_SLOTS[optimizer.type])
    if isinstance(optimizer, S.SGD) and optimizer.momentum:
        slots.append("momentum_buffer")
    if isinstance(optimizer, S.Adam | S.AdamW) and optimizer.amsgrad:
        slots.append("max_exp_avg_sq")
    if isinstance(optimizer, S.RMSprop):
        if optimizer.momentum:
            slots.append("momentum_buffer")
        if optimizer.centered:
            slots.append("grad_avg")
    return tuple(slots)


def _param_shapes(layers: list[Any], widths: list[int], *, transposed: bool) -> tuple[tuple[int, ...], ...]:
    shapes: list[tuple[int, ...]] = []
    for k, layer in enumerate(layers):
        if isinstance(layer, S.Linear):
            i_w, o_w = widths[k], widths[k + 1]
            shapes.append((i_w, o_w) if transposed else (o_w, i_w))
            if layer.bias:
                shapes.append((o_w,))
    return tuple(shapes)


def train_abi(spec: S.TrainSpec, in_features: int, task: S.Task) -> Abi:
    widths = layer_widths(spec.model, in_features)
    return Abi(
        kind="train",
        in_features=in_features,
        widths=tuple(widths),
        param_shapes=_param_shapes(spec.model, widths, transposed=False),
        slots=state_slots(spec.optimizer),
        y_dtype="int64" if task == "classification" else "float32",
        y_width=1 if task == "classification" else widths[-1],
        batch_size=spec.batch_size,
        out_width=widths[-1],
    )


class _Program:
    """C source for one spec's train_steps: the kernels, the ABI record, then the sequence."""

    def __init__(self, spec: S.TrainSpec, in_features: int, task: S.Task) -> None:
        self.spec, self.task = spec, task
        self.abi = train_abi(spec, in_features, task)
        self.widths = list(self.abi.widths)
        self.lines: list[str] = []
        # Each Linear layer's (weight, bias) parameter indices.
        self.linear: dict[int, tuple[int, int | None]] = {}
        n = 0
        for k, layer in enumerate(spec.model):
            if isinstance(layer, S.Linear):
                self.linear[k] = (n, n + 1 if layer.bias else None)
                n += 2 if layer.bias else 1
        self.sizes = [int(np.prod(s)) for s in self.abi.param_shapes]

    def emit(self, line: str) -> None:
        self.lines.append(line)

    def source(self) -> str:
        spec, widths, bs = self.spec, self.widths, self.spec.batch_size
        n_layers = len(spec.model)
        self.emit(kernels_source())
        self.emit(self.abi.c_record())
        self._configs()
        self.emit(
            "int train_steps(float **P_, float **S_, const float *X, const void *Yv, const int64_t *idx,"
            " const float *mean, const float *sd, long n_x, long n, long start, long stop, double lr,"
            " float *loss_sum, int *fresh) {"
        )
        y_type = "int64_t" if self.task == "classification" else "float"
        self.emit(f"  const {y_type} *Y = (const {y_type} *)Yv; (void)S_; /* no state: plain SGD */")
        # One workspace, allocated per call and checked: activations h, their gradients d, weight gradients g.
        buffers = [(f"h{k}", bs * widths[k]) for k in range(n_layers + 1)]
        buffers += [(f"d{k}", bs * widths[k]) for k in range(1, n_layers + 1)]
        buffers += [(f"g{i}", size) for i, size in enumerate(self.sizes)]
        total = sum(size for _, size in buffers)
        self.emit(
            f"  float *arena = (float *)malloc(sizeof(float) * {total});"
            f" long *rows = (long *)malloc(sizeof(long) * {bs});"
        )
        self.emit("  if (!arena || !rows) { free(arena); free(rows); return TS_ERR_NOMEM; }")
        offset = 0
        for name, size in buffers:
            self.emit(f"  float *{name} = arena + {offset};")
            offset += size
        self.emit("  int rc = TS_OK;")
        self.emit("  for (long b = start; b < stop; b++) {")
        self.emit(f"    long r0 = b * {bs}, m = n - r0 < {bs} ? n - r0 : {bs};")
        self.emit("    if (m <= 0) { rc = TS_ERR_INDEX; break; }")
        # Gather the batch's rows and standardise them as the module's scaler would.
        f = widths[0]
        self.emit("    for (long r = 0; r < m; r++) {")
        self.emit("      long row = idx ? idx[r0 + r] : r0 + r;")
        self.emit("      if (row < 0 || row >= n_x) { rc = TS_ERR_INDEX; break; }")
        self.emit(f"      rows[r] = row; standardize_row(h0 + r * {f}, X + row * {f}, mean, sd, {f});")
        self.emit("    }")
        self.emit("    if (rc != TS_OK) break;")
        self._forward()
        self._loss()
        self._backward()
        if spec.clip_grad_norm is not None:
            grads = ", ".join(f"g{i}" for i in range(len(self.sizes)))
            sizes = ", ".join(map(str, self.sizes))
            self.emit(f"    {{ float *grads[] = {{{grads}}}; static const long sizes[] = {{{sizes}}};")
            self.emit(f"      clip_grad_norm(grads, sizes, {len(self.sizes)}, {_f(spec.clip_grad_norm)}); }}")
        self._update()
        self.emit("    *fresh = 0;")
        self.emit("  }")
        self.emit("  free(arena); free(rows);")
        self.emit("  return rc;")
        self.emit("}")
        return "\n".join(self.lines) + "\n"

    def _forward(self) -> None:
        for k, layer in enumerate(self.spec.model):
            i_w, o_w = self.widths[k], self.widths[k + 1]
            if isinstance(layer, S.Linear):
                w, b = self.linear[k]
                bias = "NULL" if b is None else f"P_[{b}]"
                self.emit(f"    linear_forward(h{k + 1}, h{k}, P_[{w}], {bias}, m, {i_w}, {o_w});")
            else:
                name, extra = _activation_kernel(layer)
                self.emit(f"    {name}_forward(h{k + 1}, h{k}, m * {o_w}{extra});")

    def _loss(self) -> None:
        loss, last = self.spec.loss, len(self.spec.model)
        width = self.widths[-1]
        out, dout = f"h{last}", f"d{last}"
        self.emit("    float loss;")
        if isinstance(loss, S.CrossEntropyLoss):
            call = f"cross_entropy_backward(&loss, {dout}, {out}, Y, rows, m, {width}, {_f(loss.label_smoothing)})"
        else:
            if isinstance(loss, S.MSELoss):
                kind, param = "LOSS_MSE", 0.0
            elif isinstance(loss, S.L1Loss):
                kind, param = "LOSS_L1", 0.0
            elif isinstance(loss, S.HuberLoss):
                kind, param = "LOSS_HUBER", loss.delta
            elif isinstance(loss, S.SmoothL1Loss):
                kind, param = "LOSS_SMOOTH_L1", loss.beta
            else:
                assert isinstance(loss, S.BCEWithLogitsLoss)
                kind, param = "LOSS_BCE_WITH_LOGITS", 0.0
            call = f"pointwise_loss_backward(&loss, {dout}, {out}, Y, rows, m, {width}, {kind}, {_f(param)})"
        self.emit(f"    rc = {call};")
        self.emit("    if (rc != TS_OK) break;")
        self.emit("    *loss_sum += loss;")

    def _backward(self) -> None:
        for k in range(len(self.spec.model) - 1, -1, -1):
            layer = self.spec.model[k]
            i_w, o_w = self.widths[k], self.widths[k + 1]
            if isinstance(layer, S.Linear):
                w, b = self.linear[k]
                dinp = f"d{k}" if k > 0 else "NULL"  # the data needs no gradient
                dbias = "NULL" if b is None else f"g{b}"
                self.emit(f"    linear_backward({dinp}, g{w}, {dbias}, d{k + 1}, h{k}, P_[{w}], m, {i_w}, {o_w});")
            elif k > 0:
                name, extra = _activation_kernel(layer)
                self.emit(f"    {name}_backward(d{k}, h{k}, h{k + 1}, d{k + 1}, m * {o_w}{extra});")

    def _configs(self) -> None:
        opt = self.spec.optimizer
        if isinstance(opt, S.SGD):
            self.emit(
                f"static const SGDConfig OPT = {{.weight_decay = {_f(opt.weight_decay)},"
                f" .momentum = {_f(opt.momentum)}, .one_minus_dampening = {_f(1 - opt.dampening)},"
                f" .nesterov = {int(opt.nesterov)}}};"
            )
        elif isinstance(opt, S.Adam | S.AdamW):
            b1, b2 = opt.betas
            self.emit(
                f"static const AdamConfig OPT = {{.beta1 = {_d(b1)}, .beta2 = {_d(b2)},"
                f" .weight_decay = {_d(opt.weight_decay)}, .one_minus_beta1 = {_f(1 - b1)}, .beta2f = {_f(b2)},"
                f" .one_minus_beta2 = {_f(1 - b2)}, .eps = {_f(opt.eps)}, .weight_decay_f = {_f(opt.weight_decay)},"
                f" .decoupled = {int(isinstance(opt, S.AdamW))}}};"
            )
        elif isinstance(opt, S.RMSprop):
            self.emit(
                f"static const RMSpropConfig OPT = {{.alpha = {_f(opt.alpha)}, .one_minus_alpha = {_f(1 - opt.alpha)},"
                f" .eps = {_f(opt.eps)}, .weight_decay = {_f(opt.weight_decay)}, .momentum = {_f(opt.momentum)}}};"
            )
        else:
            assert isinstance(opt, S.Adagrad)
            self.emit(
                f"static const AdagradConfig OPT = {{.lr_decay = {_d(opt.lr_decay)}, .eps = {_f(opt.eps)},"
                f" .weight_decay = {_f(opt.weight_decay)}}};"
            )

    def _update(self) -> None:
        opt, slots = self.spec.optimizer, self.abi.slots
        for i, size in enumerate(self.sizes):
            s = {name: f"S_[{i * len(slots) + j}]" for j, name in enumerate(slots)}
            p, g = f"P_[{i}]", f"g{i}"
            if isinstance(opt, S.SGD):
                buf = s.get("momentum_buffer", "NULL")
                self.emit(f"    sgd_update({p}, {g}, {buf}, {size}, lr, OPT, *fresh);")
            elif isinstance(opt, S.Adam | S.AdamW):
                mx = s.get("max_exp_avg_sq", "NULL")
                self.emit(
                    f"    adam_update({p}, {g}, {s['step']}, {s['exp_avg']}, {s['exp_avg_sq']}, {mx}, {size}, lr, OPT);"
                )
            elif isinstance(opt, S.RMSprop):
                buf, avg = s.get("momentum_buffer", "NULL"), s.get("grad_avg", "NULL")
                self.emit(
                    f"    rmsprop_update({p}, {g}, {s['step']}, {s['square_avg']}, {buf}, {avg}, {size}, lr, OPT);"
                )
            else:
                self.emit(f"    adagrad_update({p}, {g}, {s['step']}, {s['sum']}, {size}, lr, OPT);")


def generate(spec: S.TrainSpec, in_features: int, task: S.Task) -> tuple[str, Abi]:
    """(C source, ABI record) for the spec's training step."""
    program = _Program(spec, in_features, task)
    return program.source(), program.abi


# -- compiling and loading ----------------------------------------------------------------------------


def compiler() -> str:
    """The C compiler: TRAINSERVE_NATIVE_COMPILER, else $CC, cc, gcc or clang on PATH."""
    configured = native_settings().native_compiler
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise NativeUnavailable(
                f"the configured C compiler {configured!r} (TRAINSERVE_NATIVE_COMPILER) is not found"
            )
        return found
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (found := shutil.which(name)):
            return found
    raise NativeUnavailable("no C compiler (cc, gcc or clang) on this machine")


@functools.cache
def compiler_identity(path: str) -> str:
    """The first line of ``<compiler> --version``: part of the cache key, so that an upgraded
    compiler never reuses a library another one built."""
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeUnavailable(f"the C compiler {path} does not run: {exc}") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise NativeUnavailable(f"the C compiler {path} does not say its version")
    return lines[0]


def own_folder(folder: Path) -> None:
    """Create the cache folder private (0700), and refuse one another user could write to:
    a library in it is loaded into this process."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    except OSError as exc:
        raise NativeUnavailable(f"compiling generated code in {folder} failed: {exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise NativeUnavailable(f"the native cache {folder} is not a folder")
    if info.st_uid != os.geteuid():
        raise NativeUnavailable(
            f"the native cache {folder} belongs to another user (uid {info.st_uid}); set TRAINSERVE_NATIVE_CACHE_DIR"
        )
    if info.st_mode & 0o022:
        raise NativeUnavailable(
            f"the native cache {folder} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o}); "
            "make it 0700 or set TRAINSERVE_NATIVE_CACHE_DIR"
        )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest_file(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _compile(compiler_path: str, source: str, folder: Path, library: Path) -> None:
    try:
        with tempfile.TemporaryDirectory(dir=folder) as work:
            c_file, so_file, digest = Path(work) / "step.c", Path(work) / "step.so", Path(work) / "step.sha256"
            c_file.write_text(source)
            done = subprocess.run(
                [compiler_path, *CFLAGS, *_LINK, "-o", str(so_file), str(c_file), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if done.returncode != 0:
                raise NativeUnavailable(f"compiling generated code failed: {done.stderr.strip()[:500]}")
            digest.write_text(_sha256(so_file) + "\n")
            # Each atomic: a concurrent process sees a whole file or none; a library it finds
            # beside another one's digest fails the check and is compiled again.
            os.replace(so_file, library)
            os.replace(digest, _digest_file(library))
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeUnavailable(f"compiling generated code in {folder} failed: {exc}") from None


def cached_library(source: str, compiler_path: str | None = None) -> Path:
    """Where the compiled library for ``source`` is (or will be) kept on disk: named by a hash
    of the source, the compiler and its version, the flags and the machine."""
    path = compiler_path or compiler()
    parts = [source, path, compiler_identity(path), *CFLAGS, *_LINK, sys.platform, platform.machine()]
    return cache_dir() / f"step-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:32]}.so"


def ensure_compiled(source: str) -> tuple[Path, bool]:
    """The library for ``source`` on disk, compiled unless a copy whose sha256 matches the
    digest recorded beside it is there; and whether it was."""
    path = compiler()
    library = cached_library(source, path)
    own_folder(library.parent)
    digest = _digest_file(library)
    with contextlib.suppress(OSError):
        if library.exists() and digest.read_text().strip() == _sha256(library):
            return library, True
    _compile(path, source, library.parent, library)
    return library, False


def load(source: str) -> tuple[ctypes.CDLL, bool]:
    """The compiled library for ``source`` (from the disk cache when there), and whether it was cached."""
    if not native_settings().native:
        raise NativeUnavailable("the native path is off (TRAINSERVE_NATIVE=false)")
    with _lock:
        key = hashlib.sha256(source.encode()).hexdigest()
        if key in _loaded:
            return _loaded[key], True
        library, cached = ensure_compiled(source)
        try:
            lib = ctypes.CDLL(str(library))
        except OSError as exc:
            raise NativeUnavailable(f"loading the compiled code failed: {exc}") from None
        _loaded[key] = lib
        return lib, cached


def _raise_for(rc: int) -> None:
    if rc == 1:
        raise MemoryError(_TS_ERRORS[1])
    raise AbiMismatch(_TS_ERRORS.get(rc, f"the native code returned {rc}"))


_TRAIN_STEPS_ARGS: list[Any] = [
    ctypes.POINTER(ctypes.c_void_p),  # P_: parameters
    ctypes.POINTER(ctypes.c_void_p),  # S_: optimizer state
    ctypes.c_void_p,  # X
    ctypes.c_void_p,  # Y
    ctypes.c_void_p,  # idx (NULL: rows in order)
    ctypes.c_void_p,  # mean
    ctypes.c_void_p,  # sd
    ctypes.c_long,  # n_x: rows in X and Y
    ctypes.c_long,  # n: rows this epoch trains on
    ctypes.c_long,  # start
    ctypes.c_long,  # stop
    ctypes.c_double,  # lr
    ctypes.c_void_p,  # loss_sum
    ctypes.POINTER(ctypes.c_int),  # fresh
]


# -- the steps object the engine's loop drives --------------------------------------------------------


def _init_state(optimizer: torch.optim.Optimizer, slots: tuple[str, ...]) -> int:
    """Create torch's own optimizer state where its lazy first step would; 1 if SGD's momentum is fresh."""
    fresh = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            for slot in slots:
                if state.get(slot) is not None:
                    continue
                if slot == "step":
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                else:
                    state[slot] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    fresh = 1 if slot == "momentum_buffer" and isinstance(optimizer, torch.optim.SGD) else fresh
    return fresh


def _pointers(tensors: list[torch.Tensor]) -> Any:
    return (ctypes.c_void_p * max(len(tensors), 1))(*[t.data_ptr() for t in tensors])


class NativeSteps:
    """Runs ranges of steps through the generated function, in place on torch's tensors.

    Nothing is captured but the module and the optimizer: each call re-reads their current
    parameter and state tensors (a restored checkpoint may have replaced them), checks each
    against the ABI record and only then hands its pointer to C."""

    name = "native"
    chunk_steps = CHUNK_STEPS

    def __init__(self, spec: S.TrainSpec, in_features: int, task: S.Task, model: nn.Module, optimizer: Any) -> None:
        source, self.abi = generate(spec, in_features, task)
        self.library, self.cached = load(source)
        self.abi.check_library(self.library)
        self.function = self.library.train_steps
        self.function.restype = ctypes.c_int
        self.function.argtypes = _TRAIN_STEPS_ARGS
        self.model, self.optimizer = model, optimizer
        if any(p.dtype != torch.float32 or not p.is_contiguous() for p in model.parameters()):
            raise NativeUnavailable("generated code needs contiguous float32 weights")
        self.fresh = ctypes.c_int(_init_state(optimizer, self.abi.slots))

    def _parameters_and_state(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        abi = self.abi
        params: list[torch.Tensor] = list(self.model.get_submodule("net").parameters())
        if len(params) != len(abi.param_shapes):
            raise AbiMismatch(
                f"the network has {len(params)} parameter tensors, the generated code {len(abi.param_shapes)}"
            )
        states: list[torch.Tensor] = []
        for i, (p, shape) in enumerate(zip(params, abi.param_shapes, strict=True)):
            _check_tensor(f"parameter {i}", p, shape, torch.float32)
            state = self.optimizer.state.get(p, {})
            for slot in abi.slots:
                t = state.get(slot)
                if t is None:
                    raise AbiMismatch(f"parameter {i} has no optimizer state {slot!r}")
                _check_tensor(f"parameter {i}'s {slot}", t, abi.slot_shape(slot, shape), torch.float32)
                states.append(t)
        return params, states

    def run(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        order: torch.Tensor | None,
        start: int,
        stop: int,
        loss_sum: torch.Tensor,
    ) -> None:
        abi = self.abi
        params, states = self._parameters_and_state()
        scaler = self.model.get_submodule("scaler")
        mean, std = scaler.get_buffer("mean"), scaler.get_buffer("std")
        _check_tensor("the scaler's mean", mean, (abi.in_features,), torch.float32)
        _check_tensor("the scaler's std", std, (abi.in_features,), torch.float32)
        _check_tensor("x", x, (len(x), abi.in_features) if x.dim() == 2 else (-1, abi.in_features), torch.float32)
        if abi.y_dtype == "int64":
            _check_tensor("y", y, (len(x),), torch.int64)
        else:
            shape = (len(x), abi.y_width) if y.dim() == 2 or abi.y_width != 1 else (len(x),)
            _check_tensor("y", y, shape, torch.float32)
        if order is not None:
            _check_tensor("order", order, (len(order),) if order.dim() == 1 else (-1,), torch.int64)
        n = len(x) if order is None else len(order)
        n_batches = -(-n // abi.batch_size)
        if not 0 <= start <= stop <= n_batches:
            raise AbiMismatch(f"steps {start} to {stop} are outside the epoch's {n_batches} batches")
        _check_tensor("loss_sum", loss_sum, (), torch.float32)
        lr = float(self.optimizer.param_groups[0]["lr"])
        with torch.no_grad():
            rc = self.function(
                _pointers(params),
                _pointers(states),
                x.data_ptr(),
                y.data_ptr(),
                None if order is None else order.data_ptr(),
                mean.data_ptr(),
                std.data_ptr(),
                len(x),
                n,
                start,
                stop,
                lr,
                loss_sum.data_ptr(),
                ctypes.byref(self.fresh),
            )
        if rc != 0:
            _raise_for(rc)
        # torch's schedulers warn unless optimizer.step() ran; the generated code did its work.
        self.optimizer._opt_called = True


# -- serving: the trained module's forward pass, one row at a time -----------------------------------

# Layers a trained module computes the same way for every row; Dropout is the identity in eval mode.
_ROWWISE_LAYERS = ACTIVATIONS | {"Linear", "Dropout"}


def rowwise_unsupported_reason(layers: list[Any]) -> str | None:
    for layer in layers:
        if layer.type not in _ROWWISE_LAYERS:
            return f"{layer.type} is served by PyTorch"
    return None


def forward_abi(layers: list[Any], in_features: int, task: str) -> Abi:
    widths = layer_widths(layers, in_features)
    return Abi(
        kind="forward",
        in_features=in_features,
        widths=tuple(widths),
        param_shapes=_param_shapes(layers, widths, transposed=True),
        out_width=2 if task == "binary" else widths[-1],
    )


def generate_forward(layers: list[Any], in_features: int, task: str) -> str:
    """C for ``forward_rows``: standardise each row, run the layers, write probabilities
    (classifiers) or outputs (regression). Linear weights come transposed, so that a
    layer's outputs accumulate side by side (vectorised) while each output still sums its
    inputs in one fixed order."""
    abi = forward_abi(layers, in_features, task)
    widths, most = abi.widths, max(abi.widths)
    lines = [kernels_source(), abi.c_record()]
    emit = lines.append
    emit("int forward_rows(float **P_, const float *X, const float *mean, const float *sd, long n, float *out) {")
    emit(f"  float *buf = (float *)malloc(sizeof(float) * {2 * most});")
    emit("  if (!buf) return TS_ERR_NOMEM;")
    emit("  for (long r = 0; r < n; r++) {")
    emit(f"    float *h = buf, *g = buf + {most}, *t; (void)g; (void)t;")
    emit(f"    standardize_row(h, X + r * {in_features}, mean, sd, {in_features});")
    n_params = 0
    for k, layer in enumerate(layers):
        i_w, o_w = widths[k], widths[k + 1]
        if isinstance(layer, S.Linear):
            bias = f"P_[{n_params + 1}]" if layer.bias else "NULL"
            emit(f"    linear_forward_row_t(g, h, P_[{n_params}], {bias}, {i_w}, {o_w});")
            emit("    t = h; h = g; g = t;")
            n_params += 2 if layer.bias else 1
        elif layer.type not in ("Identity", "Dropout"):
            name, extra = _activation_kernel(layer)
            emit(f"    {name}_forward(h, h, {o_w}{extra});")
    width = widths[-1]
    if task == "binary":  # as outputs_to_probabilities: sigmoid of the one logit, [1 - p, p]
        emit("    sigmoid_pair_row(out + r * 2, h);")
    elif task == "classification":  # softmax over the logits
        emit(f"    softmax_row(out + r * {width}, h, {width});")
    else:
        emit(f"    identity_forward(out + r * {width}, h, {width});")
    emit("  }")
    emit("  free(buf);")
    emit("  return TS_OK;")
    emit("}")
    return "\n".join(lines) + "\n"


def warm_rowwise(layers: list[Any], in_features: int, task: str) -> None:
    """Compile a trained model's row-wise forward pass into the disk cache ahead of its first
    prediction (about 0.2 s), so that an API process on this machine only loads it. Quiet
    where there is none to make: serving then compiles or falls back as usual."""
    if rowwise_unsupported_reason(layers) is None and native_settings().native:
        with contextlib.suppress(NativeUnavailable):
            ensure_compiled(generate_forward(layers, in_features, task))


class RowwiseForward:
    """A trained module's forward pass, probabilities included, as one compiled call over
    any number of rows; each row's answer is the same whatever rows share the call."""

    def __init__(self, module: nn.Module, layers: list[Any], in_features: int, task: str) -> None:
        reason = rowwise_unsupported_reason(layers)
        if reason is not None:
            raise NativeUnavailable(reason)
        self.abi = forward_abi(layers, in_features, task)
        self.library, _ = load(generate_forward(layers, in_features, task))
        self.abi.check_library(self.library)
        self.function = self.library.forward_rows
        self.function.restype = ctypes.c_int
        pointer, count = ctypes.c_void_p, ctypes.c_long
        self.function.argtypes = [ctypes.POINTER(pointer), pointer, pointer, pointer, count, pointer]
        # A private copy of the weights (each Linear's transposed) and the scaler's mean and
        # std, packed in one float32 tensor: each call checks that one tensor against the
        # ABI record and reads its address afresh, then points at its parts by offset.
        scaler = module.get_submodule("scaler")
        parts: list[torch.Tensor] = []
        for layer in module.get_submodule("net").modules():
            if isinstance(layer, nn.Linear):
                parts.append(layer.weight.detach().float().t())
                if layer.bias is not None:
                    parts.append(layer.bias.detach().float())
        shapes = [tuple(part.shape) for part in parts]
        if shapes != list(self.abi.param_shapes):
            raise AbiMismatch(f"the module's weights have shapes {shapes}, the generated code {self.abi.param_shapes}")
        parts += [scaler.get_buffer("mean").detach().float(), scaler.get_buffer("std").detach().float()]
        for name, part in zip(("mean", "std"), parts[-2:], strict=True):
            _check_tensor(f"the scaler's {name}", part, (in_features,), torch.float32)
        self._flat = torch.cat([part.reshape(-1) for part in parts]).contiguous()
        starts = np.cumsum([0, *(part.numel() for part in parts)])[:-1] * self._flat.element_size()
        self._offsets = [int(s) for s in starts]  # bytes: the weights', then mean's and std's
        self._pointer_array = ctypes.c_void_p * max(len(self._offsets) - 2, 1)
        self.width = self.abi.out_width

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float32 rows (n, in_features), C-contiguous -> probabilities or outputs (n, width)."""
        width = self.abi.in_features
        _check_array("x", x, (len(x), width) if getattr(x, "ndim", 0) == 2 else (-1, width))
        flat = self._flat
        _check_tensor("the weights", flat, (self._offsets[-1] // 4 + width,), torch.float32)
        base = flat.data_ptr()
        *weights, mean, sd = (base + offset for offset in self._offsets)
        out = np.empty((len(x), self.width), dtype=np.float32)
        rc = self.function(self._pointer_array(*weights), x.ctypes.data, mean, sd, len(x), out.ctypes.data)
        if rc != 0:
            _raise_for(rc)
        return out
