"""The whole training step as generated C: many steps per call, for small batches on CPU.

With the guide's per-sample SGD, an eager PyTorch step spends nearly all its time in
per-operation overhead (dispatch, autograd bookkeeping, optimizer loops), not in
arithmetic. So for a spec built from supported pieces, this module writes one C function
that runs a range of steps (forward, loss, backward, optional clipping, optimizer update)
over the epoch's rows, compiles it with the system C compiler, caches the shared library
on disk under a hash of its source, and calls it through ctypes on the very tensors the
module and the torch optimizer own. The weights and optimizer state therefore never leave
torch's own storage: evaluation, checkpoints and saving see them as usual, and a
checkpoint taken between two calls resumes bit for bit.

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
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainserve.errors import NativeUnavailable
from trainserve.training import spec as S

ACTIVATIONS = frozenset({"Tanh", "ReLU", "Sigmoid", "GELU", "SiLU", "Mish", "ELU", "LeakyReLU", "Softplus", "Identity"})
# Native code wins where torch's per-step overhead dominates: small batches times small models.
MAX_WORK_PER_STEP = 1 << 17  # batch_size x parameters
CHUNK_STEPS = 1024  # steps per call; checkpoints and cancel checks fall between calls
_CFLAGS = ["-O3", "-std=c99", "-shared", "-fPIC", "-fno-math-errno"]
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


def cache_dir() -> Path:
    """Where compiled step functions are kept between runs and processes."""
    configured = os.environ.get("TRAINSERVE_NATIVE_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainserve" / "native"


def unsupported_reason(spec: S.TrainSpec, n_parameters: int, device: torch.device) -> str | None:
    """Why this spec runs eagerly, or None when generated code can and should run it."""
    if spec.compile == "off":
        return "compile is off in the spec"
    if device.type != "cpu":
        return f"generated code runs on CPU; this run is on {device.type}"
    if spec.autocast is not None:
        return "autocast runs in eager PyTorch"
    if getattr(spec.loss, "weight", None) is not None or getattr(spec.loss, "pos_weight", None) is not None:
        return "class weights run in eager PyTorch"
    for layer in spec.model:
        if not isinstance(layer, S.Linear) and layer.type not in ACTIVATIONS:
            return f"{layer.type} runs in eager PyTorch"
    if spec.batch_size * n_parameters > MAX_WORK_PER_STEP:
        return "the batch is large enough for eager PyTorch's BLAS kernels to win"
    return None


# -- code generation -------------------------------------------------------------------------------


def _f(value: float) -> str:
    """A C float literal that round-trips the Python float through float32 as torch does."""
    text = f"{float(torch.tensor(value, dtype=torch.float32)):.9g}"
    return f"{text}f" if any(c in text for c in ".en") else f"{text}.0f"


def _d(value: float) -> str:
    return f"{float(value):.17g}"


def _activation(layer: Any, x: str, y: str, dy: str) -> tuple[str, str]:
    """(forward expression for y, backward expression for dx) in terms of x, y and dy."""
    kind = layer.type
    if kind == "Tanh":
        return f"tanhf({x})", f"{dy} * (1.0f - {y} * {y})"
    if kind == "ReLU":
        return f"({x} > 0.0f ? {x} : 0.0f)", f"({x} > 0.0f ? {dy} : 0.0f)"
    if kind == "Sigmoid":
        return f"sigm({x})", f"{dy} * {y} * (1.0f - {y})"
    if kind == "SiLU":
        return f"{x} * sigm({x})", f"{dy} * (sigm({x}) * (1.0f + {x} * (1.0f - sigm({x}))))"
    if kind == "Mish":
        return f"{x} * tanhf(softplus1({x}))", f"{dy} * mish_grad({x})"
    if kind == "ELU":
        a = _f(layer.alpha)
        return f"({x} > 0.0f ? {x} : {a} * expm1f({x}))", f"({x} > 0.0f ? {dy} : {dy} * {a} * expf({x}))"
    if kind == "LeakyReLU":
        s = _f(layer.negative_slope)
        return f"({x} > 0.0f ? {x} : {x} * {s})", f"({x} > 0.0f ? {dy} : {dy} * {s})"
    if kind == "Softplus":
        b, t = _f(layer.beta), _f(layer.threshold)
        return (
            f"({x} * {b} > {t} ? {x} : log1pf(expf({x} * {b})) / {b})",
            f"({x} * {b} > {t} ? {dy} : {dy} * sigm({x} * {b}))",
        )
    if kind == "GELU":
        if layer.approximate == "tanh":
            return f"gelu_tanh({x})", f"{dy} * gelu_tanh_grad({x})"
        return f"0.5f * {x} * (1.0f + erff({x} * 0.70710678118654752f))", f"{dy} * gelu_grad({x})"
    assert kind == "Identity"
    return x, dy


_PRELUDE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
static inline float sigm(float v) { return 1.0f / (1.0f + expf(-v)); }
static inline float softplus1(float v) { return v > 20.0f ? v : log1pf(expf(v)); }
static inline float mish_grad(float v) {
    float t = tanhf(softplus1(v));
    return t + v * sigm(v) * (1.0f - t * t);
}
static inline float gelu_grad(float v) {
    return 0.5f * (1.0f + erff(v * 0.70710678118654752f)) + v * 0.39894228040143268f * expf(-0.5f * v * v);
}
static inline float gelu_tanh(float v) {
    float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (1.0f + tanhf(inner));
}
static inline float gelu_tanh_grad(float v) {
    float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
    float t = tanhf(inner);
    return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * 0.79788456080286536f * (1.0f + 3.0f * 0.044715f * v * v);
}
"""


def layer_widths(layers: list[Any], in_features: int) -> list[int]:
    """The width of the data into the first layer and out of each layer."""
    widths = [in_features]
    for layer in layers:
        widths.append(layer.out_features if isinstance(layer, S.Linear) else widths[-1])
    return widths


class _Program:
    """C source for one spec, and the order of the tensors the function takes."""

    def __init__(self, spec: S.TrainSpec, in_features: int, task: S.Task) -> None:
        self.spec, self.task = spec, task
        self.lines: list[str] = []
        self.params: list[tuple[str, int]] = []  # (C name, element count), in net.parameters() order
        self.state_names: list[str] = []  # optimizer state slots per parameter, in order
        self._layout(in_features)

    def _layout(self, in_features: int) -> None:
        self.widths = widths = layer_widths(self.spec.model, in_features)
        self.linear: dict[int, tuple[str, str | None]] = {}
        for k, layer in enumerate(self.spec.model):
            if isinstance(layer, S.Linear):
                w = f"P{len(self.params)}"
                self.params.append((w, layer.out_features * widths[k]))
                b = None
                if layer.bias:
                    b = f"P{len(self.params)}"
                    self.params.append((b, layer.out_features))
                self.linear[k] = (w, b)
        opt = self.spec.optimizer
        slots = {
            "SGD": ["momentum_buffer"] if isinstance(opt, S.SGD) and opt.momentum else [],
            "Adam": ["step", "exp_avg", "exp_avg_sq"],
            "AdamW": ["step", "exp_avg", "exp_avg_sq"],
            "RMSprop": ["step", "square_avg"],
            "Adagrad": ["step", "sum"],
        }[opt.type]
        if isinstance(opt, S.Adam | S.AdamW) and opt.amsgrad:
            slots.append("max_exp_avg_sq")
        if isinstance(opt, S.RMSprop):
            if opt.momentum:
                slots.append("momentum_buffer")
            if opt.centered:
                slots.append("grad_avg")
        self.state_names = slots

    def emit(self, line: str) -> None:
        self.lines.append(line)

    def source(self) -> str:
        spec, widths = self.spec, self.widths
        bs, n_layers = spec.batch_size, len(spec.model)
        self.emit(_PRELUDE)
        self.emit(
            "void train_steps(float **P_, float **S_, const float *X, const void *Yv, const int64_t *idx,"
            " const float *mean, const float *sd, long n, long start, long stop, double lr, float *loss_sum,"
            " int *fresh) {"
        )
        for i, (name, _) in enumerate(self.params):
            self.emit(f"  float *{name} = P_[{i}];")
        ys = "const int64_t *Y = (const int64_t *)Yv;" if self.task == "classification" else "const float *Y = Yv;"
        self.emit(f"  {ys}")
        self.emit(f"  float *h0 = malloc(sizeof(float) * {bs * widths[0]}); long *rows = malloc(sizeof(long) * {bs});")
        for k in range(1, n_layers + 1):
            self.emit(f"  float *h{k} = malloc(sizeof(float) * {bs * widths[k]});")
            self.emit(f"  float *d{k} = malloc(sizeof(float) * {bs * widths[k]});")
        for name, size in self.params:
            self.emit(f"  float *g{name} = malloc(sizeof(float) * {size});")
        self.emit("  for (long b = start; b < stop; b++) {")
        self.emit(f"    long r0 = b * {bs}; int m = (int)(n - r0 < {bs} ? n - r0 : {bs});")
        # Gather the batch's rows and standardise them as the module's scaler would: (x - mean) / std.
        self.emit("    for (int r = 0; r < m; r++) {")
        self.emit("      long row = idx ? idx[r0 + r] : r0 + r; rows[r] = row;")
        f = widths[0]
        self.emit(f"      for (int i = 0; i < {f}; i++) h0[r * {f} + i] = (X[row * {f} + i] - mean[i]) / sd[i];")
        self.emit("    }")
        self._forward()
        self._loss()
        self._backward()
        if spec.clip_grad_norm is not None:
            self._clip(spec.clip_grad_norm)
        self._update()
        self.emit("    *fresh = 0;")
        self.emit("  }")
        self.emit("  free(h0); free(rows);")
        for k in range(1, n_layers + 1):
            self.emit(f"  free(h{k}); free(d{k});")
        for name, _ in self.params:
            self.emit(f"  free(g{name});")
        self.emit("}")
        return "\n".join(self.lines) + "\n"

    def _forward(self) -> None:
        for k, layer in enumerate(self.spec.model):
            i_w, o_w = self.widths[k], self.widths[k + 1]
            src, dst = f"h{k}", f"h{k + 1}"
            if isinstance(layer, S.Linear):
                w, b = self.linear[k]
                bias = b + "[o]" if b else "0.0f"
                self.emit(f"    for (int r = 0; r < m; r++) for (int o = 0; o < {o_w}; o++) {{")
                self.emit(f"      const float *wr = {w} + o * {i_w}; const float *xr = {src} + r * {i_w};")
                self.emit(f"      float acc = 0.0f; for (int i = 0; i < {i_w}; i++) acc += wr[i] * xr[i];")
                self.emit(f"      {dst}[r * {o_w} + o] = acc + {bias};")
                self.emit("    }")
            else:
                forward, _ = _activation(layer, "v", "", "")
                self.emit(f"    for (int j = 0; j < m * {o_w}; j++) {{ float v = {src}[j]; {dst}[j] = {forward}; }}")

    def _loss(self) -> None:
        loss, last = self.spec.loss, len(self.spec.model)
        width = self.widths[-1]
        out, dout = f"h{last}", f"d{last}"
        self.emit("    float total = 0.0f;")
        if isinstance(loss, S.CrossEntropyLoss):
            ls = _f(loss.label_smoothing)
            self.emit("    for (int r = 0; r < m; r++) {")
            self.emit(f"      const float *z = {out} + r * {width}; float *dz = {dout} + r * {width};")
            self.emit(f"      float mx = z[0]; for (int c = 1; c < {width}; c++) if (z[c] > mx) mx = z[c];")
            self.emit(f"      float se = 0.0f; for (int c = 0; c < {width}; c++) se += expf(z[c] - mx);")
            self.emit("      float lse = mx + logf(se); long t = Y[rows[r]]; float all = 0.0f;")
            self.emit(f"      for (int c = 0; c < {width}; c++) {{")
            self.emit(f"        all += z[c] - lse; dz[c] = (expf(z[c] - lse) - {ls} / {width}.0f) / (float)m;")
            self.emit("      }")
            self.emit(f"      dz[t] -= (1.0f - {ls}) / (float)m;")
            self.emit(f"      total += -(1.0f - {ls}) * (z[t] - lse) - {ls} / {width}.0f * all;")
            self.emit("    }")
            self.emit("    float loss = total / (float)m;")
            return
        count = f"(float)(m * {width})"
        self.emit(f"    for (int j = 0; j < m * {width}; j++) {{")
        self.emit(
            f"      float p = {out}[j], t = Y[rows[j / {width}] * {width} + j % {width}], e = p - t, a = fabsf(e);"
        )
        self.emit("      float s = (e > 0.0f) - (e < 0.0f);")
        if isinstance(loss, S.MSELoss):
            self.emit(f"      total += e * e; {dout}[j] = 2.0f * e / {count};")
        elif isinstance(loss, S.L1Loss):
            self.emit(f"      total += a; {dout}[j] = s / {count};")
        elif isinstance(loss, S.HuberLoss):
            dl = _f(loss.delta)
            self.emit(f"      total += a < {dl} ? 0.5f * e * e : {dl} * (a - 0.5f * {dl});")
            self.emit(f"      {dout}[j] = (a < {dl} ? e : {dl} * s) / {count};")
        elif isinstance(loss, S.SmoothL1Loss):
            if loss.beta == 0:
                self.emit(f"      total += a; {dout}[j] = s / {count};")
            else:
                bt = _f(loss.beta)
                self.emit(f"      total += a < {bt} ? 0.5f * e * e / {bt} : a - 0.5f * {bt};")
                self.emit(f"      {dout}[j] = (a < {bt} ? e / {bt} : s) / {count};")
        else:
            assert isinstance(loss, S.BCEWithLogitsLoss)
            self.emit("      total += (p > 0.0f ? p : 0.0f) - p * t + log1pf(expf(-fabsf(p)));")
            self.emit(f"      {dout}[j] = (sigm(p) - t) / {count};")
        self.emit("    }")
        self.emit(f"    float loss = total / {count};")

    def _backward(self) -> None:
        self.emit("    *loss_sum += loss;")
        for k in range(len(self.spec.model) - 1, -1, -1):
            layer = self.spec.model[k]
            i_w, o_w = self.widths[k], self.widths[k + 1]
            src, dst_grad, src_grad = f"h{k}", f"d{k + 1}", f"d{k}"
            needs_input_grad = k > 0
            if isinstance(layer, S.Linear):
                w, b = self.linear[k]
                self.emit(f"    memset(g{w}, 0, sizeof(float) * {o_w * i_w});")
                if b:
                    self.emit(f"    memset(g{b}, 0, sizeof(float) * {o_w});")
                self.emit("    for (int r = 0; r < m; r++) {")
                self.emit(f"      const float *xr = {src} + r * {i_w}; const float *dr = {dst_grad} + r * {o_w};")
                self.emit(f"      for (int o = 0; o < {o_w}; o++) {{")
                self.emit(f"        float d = dr[o]; float *gw = g{w} + o * {i_w};")
                if b:
                    self.emit(f"        g{b}[o] += d;")
                self.emit(f"        for (int i = 0; i < {i_w}; i++) gw[i] += d * xr[i];")
                self.emit("      }")
                self.emit("    }")
                if needs_input_grad:
                    self.emit("    for (int r = 0; r < m; r++) {")
                    self.emit(f"      float *dx = {src_grad} + r * {i_w}; const float *dr = {dst_grad} + r * {o_w};")
                    self.emit(f"      for (int i = 0; i < {i_w}; i++) dx[i] = 0.0f;")
                    self.emit(f"      for (int o = 0; o < {o_w}; o++) {{")
                    self.emit(f"        float d = dr[o]; const float *wr = {w} + o * {i_w};")
                    self.emit(f"        for (int i = 0; i < {i_w}; i++) dx[i] += d * wr[i];")
                    self.emit("      }")
                    self.emit("    }")
            elif needs_input_grad:
                _, backward = _activation(layer, "x", "y", "dy")
                self.emit(f"    for (int j = 0; j < m * {o_w}; j++) {{")
                self.emit(f"      float x = {src}[j], y = h{k + 1}[j], dy = {dst_grad}[j]; (void)x; (void)y;")
                self.emit(f"      {src_grad}[j] = {backward};")
                self.emit("    }")

    def _clip(self, max_norm: float) -> None:
        # torch.nn.utils.clip_grad_norm_: the norm of the per-tensor norms, then one scale factor.
        self.emit("    { float sq = 0.0f;")
        for name, size in self.params:
            self.emit(f"      {{ float t = 0.0f; for (int j = 0; j < {size}; j++) t += g{name}[j] * g{name}[j];")
            self.emit("        float nt = sqrtf(t); sq += nt * nt; }")
        self.emit(f"      float coef = {_f(max_norm)} / (sqrtf(sq) + 1e-6f);")
        self.emit("      if (coef < 1.0f) {")
        for name, size in self.params:
            self.emit(f"        for (int j = 0; j < {size}; j++) g{name}[j] *= coef;")
        self.emit("      } }")

    def _update(self) -> None:
        opt = self.spec.optimizer
        n_slots = len(self.state_names)
        for index, (name, size) in enumerate(self.params):
            slot = {s: f"S_[{index * n_slots + j}]" for j, s in enumerate(self.state_names)}
            self.emit("    {")
            self.emit(f"      float *p = {name}; const float *gr = g{name};")
            if "step" in slot:
                self.emit(f"      float *step = {slot['step']}; *step += 1.0f; double st = *step; (void)st;")
            if isinstance(opt, S.Adam | S.AdamW):
                b1, b2 = _d(opt.betas[0]), _d(opt.betas[1])
                self.emit(f"      float *m1 = {slot['exp_avg']}, *m2 = {slot['exp_avg_sq']};")
                self.emit(f"      double bc1 = 1.0 - pow({b1}, st), bc2s = sqrt(1.0 - pow({b2}, st));")
                self.emit("      float step_size = (float)(lr / bc1), bc2f = (float)bc2s;")
                if isinstance(opt, S.AdamW) and opt.weight_decay:
                    self.emit(f"      float decay = (float)(1.0 - lr * {_d(opt.weight_decay)});")
                if opt.amsgrad:
                    self.emit(f"      float *mx = {slot['max_exp_avg_sq']};")
                self.emit(f"      for (int j = 0; j < {size}; j++) {{")
                self.emit("        float g = gr[j];")
                if isinstance(opt, S.AdamW) and opt.weight_decay:
                    self.emit("        p[j] *= decay;")
                elif opt.weight_decay:
                    self.emit(f"        g += {_f(opt.weight_decay)} * p[j];")
                self.emit(f"        m1[j] += (g - m1[j]) * {_f(1 - opt.betas[0])};")
                self.emit(f"        m2[j] = m2[j] * {_f(opt.betas[1])} + {_f(1 - opt.betas[1])} * g * g;")
                second = "m2[j]"
                if opt.amsgrad:
                    self.emit("        if (m2[j] > mx[j]) mx[j] = m2[j];")
                    second = "mx[j]"
                self.emit(f"        float denom = sqrtf({second}) / bc2f + {_f(opt.eps)};")
                self.emit("        p[j] -= step_size * (m1[j] / denom);")
                self.emit("      }")
            elif isinstance(opt, S.SGD):
                self.emit(f"      for (int j = 0; j < {size}; j++) {{")
                self.emit("        float g = gr[j];")
                if opt.weight_decay:
                    self.emit(f"        g += {_f(opt.weight_decay)} * p[j];")
                if opt.momentum:
                    mom = _f(opt.momentum)
                    self.emit(f"        float *buf = {slot['momentum_buffer']};")
                    self.emit(f"        buf[j] = *fresh ? g : buf[j] * {mom} + {_f(1 - opt.dampening)} * g;")
                    self.emit(f"        g = {'g + ' + mom + ' * buf[j]' if opt.nesterov else 'buf[j]'};")
                self.emit("        p[j] -= (float)lr * g;")
                self.emit("      }")
            elif isinstance(opt, S.RMSprop):
                self.emit(f"      float *sa = {slot['square_avg']};")
                self.emit(f"      for (int j = 0; j < {size}; j++) {{")
                self.emit("        float g = gr[j];")
                if opt.weight_decay:
                    self.emit(f"        g += {_f(opt.weight_decay)} * p[j];")
                self.emit(f"        sa[j] = sa[j] * {_f(opt.alpha)} + {_f(1 - opt.alpha)} * g * g;")
                if opt.centered:
                    self.emit(f"        float *ga = {slot['grad_avg']};")
                    self.emit(f"        ga[j] += (g - ga[j]) * {_f(1 - opt.alpha)};")
                    self.emit(f"        float avg = sqrtf(sa[j] - ga[j] * ga[j]) + {_f(opt.eps)};")
                else:
                    self.emit(f"        float avg = sqrtf(sa[j]) + {_f(opt.eps)};")
                if opt.momentum:
                    self.emit(f"        float *buf = {slot['momentum_buffer']};")
                    self.emit(f"        buf[j] = buf[j] * {_f(opt.momentum)} + g / avg;")
                    self.emit("        p[j] -= (float)lr * buf[j];")
                else:
                    self.emit("        p[j] -= (float)lr * (g / avg);")
                self.emit("      }")
            else:
                assert isinstance(opt, S.Adagrad)
                self.emit(f"      float *sm = {slot['sum']};")
                self.emit(f"      float clr = (float)(lr / (1.0 + (st - 1.0) * {_d(opt.lr_decay)}));")
                self.emit(f"      for (int j = 0; j < {size}; j++) {{")
                self.emit("        float g = gr[j];")
                if opt.weight_decay:
                    self.emit(f"        g += {_f(opt.weight_decay)} * p[j];")
                self.emit(f"        sm[j] += g * g; p[j] -= clr * (g / (sqrtf(sm[j]) + {_f(opt.eps)}));")
                self.emit("      }")
            self.emit("    }")


def generate(spec: S.TrainSpec, in_features: int, task: S.Task) -> tuple[str, list[str]]:
    """(C source, optimizer state slots per parameter) for the spec's training step."""
    program = _Program(spec, in_features, task)
    return program.source(), program.state_names


# -- compiling and loading ----------------------------------------------------------------------------


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise NativeUnavailable("no C compiler (cc, gcc or clang) on this worker")


def _compile(compiler: str, source: str, folder: Path, library: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as work:
            c_file, so_file = Path(work) / "step.c", Path(work) / "step.so"
            c_file.write_text(source)
            done = subprocess.run(
                [compiler, *_CFLAGS, "-o", str(so_file), str(c_file), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if done.returncode != 0:
                raise NativeUnavailable(f"compiling generated code failed: {done.stderr.strip()[:500]}")
            os.replace(so_file, library)  # atomic: a concurrent worker sees all of it or none
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeUnavailable(f"compiling generated code in {folder} failed: {exc}") from None


def cached_library(source: str, compiler: str | None = None) -> Path:
    """Where the compiled library for ``source`` is (or will be) kept on disk."""
    parts = [source, compiler or _compiler(), *_CFLAGS, sys.platform]
    return cache_dir() / f"step-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:32]}.so"


def load(source: str) -> tuple[ctypes.CDLL, bool]:
    """The compiled library for ``source`` (from the disk cache when there), and whether it was cached."""
    compiler = _compiler()
    library = cached_library(source, compiler)
    key, folder = library.stem, library.parent
    with _lock:
        if key in _loaded:
            return _loaded[key], True
        cached = library.exists()
        if not cached:
            _compile(compiler, source, folder, library)
        try:
            lib = ctypes.CDLL(str(library))
        except OSError as exc:
            raise NativeUnavailable(f"loading the compiled code failed: {exc}") from None
        _loaded[key] = lib
        return lib, cached


_TRAIN_STEPS_ARGS: list[Any] = [
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_long,
    ctypes.c_long,
    ctypes.c_long,
    ctypes.c_double,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_int),
]


# -- the steps object the engine's loop drives --------------------------------------------------------


def _init_state(optimizer: torch.optim.Optimizer, slots: list[str]) -> int:
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


class NativeSteps:
    """Runs ranges of steps through the generated function, in place on torch's tensors."""

    name = "native"
    chunk_steps = CHUNK_STEPS

    def __init__(self, spec: S.TrainSpec, in_features: int, task: S.Task, model: nn.Module, optimizer: Any) -> None:
        source, slots = generate(spec, in_features, task)
        self.library, self.cached = load(source)
        self.library.train_steps.restype = None
        self.library.train_steps.argtypes = _TRAIN_STEPS_ARGS
        self.optimizer = optimizer
        scaler = model.get_submodule("scaler")
        self.mean, self.std = scaler.get_buffer("mean"), scaler.get_buffer("std")
        params = list(model.get_submodule("net").parameters())
        if any(p.dtype != torch.float32 or not p.is_contiguous() for p in params):
            raise NativeUnavailable("generated code needs contiguous float32 weights")
        self.fresh = ctypes.c_int(_init_state(optimizer, slots))
        states = [optimizer.state[p][slot] for p in params for slot in slots]
        # Keep the pointer arrays alive as long as the tensors they point into.
        self.param_ptrs = (ctypes.c_void_p * max(len(params), 1))(*[p.data_ptr() for p in params])
        self.state_ptrs = (ctypes.c_void_p * max(len(states), 1))(*[t.data_ptr() for t in states])
        self._keep = (params, states)

    def run(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        order: torch.Tensor | None,
        start: int,
        stop: int,
        loss_sum: torch.Tensor,
    ) -> None:
        lr = float(self.optimizer.param_groups[0]["lr"])
        if not (x.is_contiguous() and y.is_contiguous() and (order is None or order.is_contiguous())):
            raise ValueError("the native loop needs contiguous data")  # the engine's loop never hands it other
        with torch.no_grad():
            self.library.train_steps(
                self.param_ptrs,
                self.state_ptrs,
                x.data_ptr(),
                y.data_ptr(),
                None if order is None else order.data_ptr(),
                self.mean.data_ptr(),
                self.std.data_ptr(),
                len(x) if order is None else len(order),
                start,
                stop,
                lr,
                loss_sum.data_ptr(),
                ctypes.byref(self.fresh),
            )
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


def generate_forward(layers: list[Any], in_features: int, task: str) -> str:
    """C for ``forward_rows``: standardise each row, run the layers, write probabilities
    (classifiers) or outputs (regression). Linear weights come transposed, so that a
    layer's outputs accumulate side by side (vectorised) while each output still sums its
    inputs in one fixed order."""
    widths, lines = layer_widths(layers, in_features), [_PRELUDE]
    emit = lines.append
    emit("void forward_rows(float **P_, const float *X, const float *mean, const float *sd, long n, float *out) {")
    emit(f"  float bufs[2][{max(widths)}];")
    emit("  for (long r = 0; r < n; r++) {")
    emit("    float *h = bufs[0], *g = bufs[1], *t;")
    emit(f"    const float *x = X + r * {in_features};")
    emit(f"    for (int i = 0; i < {in_features}; i++) h[i] = (x[i] - mean[i]) / sd[i];")
    n_params = 0
    for k, layer in enumerate(layers):
        i_w, o_w = widths[k], widths[k + 1]
        if isinstance(layer, S.Linear):
            w = f"P_[{n_params}]"
            bias = f"P_[{n_params + 1}][o]" if layer.bias else "0.0f"
            n_params += 2 if layer.bias else 1
            emit(f"    for (int o = 0; o < {o_w}; o++) g[o] = {bias};")
            emit(f"    for (int i = 0; i < {i_w}; i++) {{")
            emit(f"      const float v = h[i], *wr = {w} + i * {o_w};")
            emit(f"      for (int o = 0; o < {o_w}; o++) g[o] += wr[o] * v;")
            emit("    }")
            emit("    t = h; h = g; g = t;")
        elif layer.type not in ("Identity", "Dropout"):
            forward, _ = _activation(layer, "v", "", "")
            emit(f"    for (int j = 0; j < {o_w}; j++) {{ float v = h[j]; h[j] = {forward}; }}")
    width = widths[-1]
    if task == "binary":  # as outputs_to_probabilities: sigmoid of the one logit, [1 - p, p]
        emit("    { float p = 1.0f / (1.0f + expf(-h[0])); out[r * 2] = 1.0f - p; out[r * 2 + 1] = p; }")
    elif task == "classification":  # softmax over the logits
        emit(f"    float top = h[0]; for (int j = 1; j < {width}; j++) if (h[j] > top) top = h[j];")
        emit(f"    float total = 0.0f; for (int j = 0; j < {width}; j++) {{ h[j] = expf(h[j] - top); total += h[j]; }}")
        emit(f"    for (int j = 0; j < {width}; j++) out[r * {width} + j] = h[j] / total;")
    else:
        emit(f"    for (int j = 0; j < {width}; j++) out[r * {width} + j] = h[j];")
    emit("  }")
    emit("}")
    return "\n".join(lines) + "\n"


def warm_rowwise(layers: list[Any], in_features: int, task: str) -> None:
    """Compile a trained model's row-wise forward pass into the disk cache ahead of its first
    prediction (about 0.2 s), so that an API process on this machine only loads it. Quiet
    where there is none to make: serving then compiles or falls back as usual."""
    if rowwise_unsupported_reason(layers) is None:
        with contextlib.suppress(NativeUnavailable):
            load(generate_forward(layers, in_features, task))


class RowwiseForward:
    """A trained module's forward pass, probabilities included, as one compiled call over
    any number of rows; each row's answer is the same whatever rows share the call."""

    def __init__(self, module: nn.Module, layers: list[Any], in_features: int, task: str) -> None:
        reason = rowwise_unsupported_reason(layers)
        if reason is not None:
            raise NativeUnavailable(reason)
        self.library, _ = load(generate_forward(layers, in_features, task))
        self.library.forward_rows.restype = None
        pointer, count = ctypes.c_void_p, ctypes.c_long
        self.library.forward_rows.argtypes = [ctypes.POINTER(pointer), pointer, pointer, pointer, count, pointer]
        scaler = module.get_submodule("scaler")
        self._scale = [scaler.get_buffer(name).detach().float().contiguous().numpy() for name in ("mean", "std")]
        arrays = []
        for layer in module.get_submodule("net").modules():
            if isinstance(layer, nn.Linear):
                arrays.append(np.ascontiguousarray(layer.weight.detach().float().numpy().T))
                if layer.bias is not None:
                    arrays.append(layer.bias.detach().float().contiguous().numpy())
        self._arrays = arrays  # the pointers below point into these
        self._pointers = (ctypes.c_void_p * max(len(arrays), 1))(*[a.ctypes.data for a in arrays])
        self.width = 2 if task == "binary" else layer_widths(layers, in_features)[-1]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float32 rows (n, in_features), C-contiguous -> probabilities or outputs (n, width)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((len(x), self.width), dtype=np.float32)
        mean, sd = self._scale
        call = self.library.forward_rows
        call(self._pointers, x.ctypes.data, mean.ctypes.data, sd.ctypes.data, len(x), out.ctypes.data)
        return out
