"""The native path's fence (trainserve.training.native): the ABI record checked at both
ctypes boundaries, the private compile cache and its digests, the settings, and the torch
optimizer-state layout the generated code assumes.

CPU only, tiny networks; one unit is compiled for the whole module (a warm cache: ~1 s).
"""

from __future__ import annotations

import copy
import platform
from typing import Any, cast

import numpy as np
import pytest
import torch

from tests.small_models import fit, linear, moons
from trainserve.errors import NativeUnavailable
from trainserve.storage.base import new_id
from trainserve.training import loop, native, network
from trainserve.training import spec as S

LAYERS = [linear(6), "Tanh", linear(2)]


def steps_for(optimizer: Any = "Adam", batch_size: int = 4) -> native.NativeSteps:
    spec = S.TrainSpec.model_validate(
        {"model": LAYERS, "loss": "CrossEntropyLoss", "optimizer": optimizer, "batch_size": batch_size}
    )
    torch.manual_seed(0)
    model = network.TabularNet(spec.model, 2)
    optimizer_ = loop.build_optimizer(spec.optimizer, model.net.parameters())
    return native.NativeSteps(spec, 2, "classification", model, optimizer_)


def data(n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = moons(n)
    return torch.from_numpy(x), torch.from_numpy(y).long()


# -- the training boundary: NativeSteps.run ------------------------------------------------------------


def test_a_wrong_tensor_at_the_training_boundary_raises_before_any_pointer_crosses():
    steps = steps_for()
    x, y = data()
    loss = torch.zeros(())
    before = [p.detach().clone() for p in steps.model.parameters()]
    wrong: dict[str, tuple[tuple[Any, ...], str]] = {
        "x float64": ((x.double(), y, None, 0, 1, loss), "x: dtype torch.float64"),
        "x too narrow": ((x[:, :1].contiguous(), y, None, 0, 1, loss), r"x: shape \(20, 1\)"),
        "x transposed": ((x.t(), y, None, 0, 1, loss), r"x: shape \(2, 20\)"),
        "x strided": ((x[::2], y[::2], None, 0, 1, loss), "x: not contiguous"),
        "y float": ((x, y.float(), None, 0, 1, loss), "y: dtype torch.float32"),
        "y short": ((x, y[:10], None, 0, 1, loss), r"y: shape \(10,\)"),
        "order int32": ((x, y, torch.arange(20, dtype=torch.int32), 0, 1, loss), "order: dtype torch.int32"),
        "loss float64": ((x, y, None, 0, 1, loss.double()), "loss_sum: dtype"),
        "steps past the epoch": ((x, y, None, 0, 6, loss), "outside the epoch's 5 batches"),
        "a negative start": ((x, y, None, -1, 1, loss), "outside the epoch"),
    }
    for case, (args, message) in wrong.items():
        with pytest.raises(native.AbiMismatch, match=message):
            steps.run(*args)
        assert all(torch.equal(a, b) for a, b in zip(before, steps.model.parameters(), strict=True)), case
    # What C itself fences: a row index outside the data, a label outside the classes.
    with pytest.raises(native.AbiMismatch, match="row index is outside the data"):
        steps.run(x, y, torch.tensor([0, 1, 2, 20]), 0, 1, loss)
    with pytest.raises(native.AbiMismatch, match="class label is outside"):
        steps.run(x, torch.where(y == 1, 2, y), None, 0, 5, loss)
    steps.run(x, y, None, 0, 5, loss)  # the right tensors still train
    assert float(loss) > 0


def test_a_wrong_weight_or_state_tensor_raises():
    steps = steps_for()
    x, y = data()
    first = cast(torch.nn.Linear, steps.model.get_submodule("net.0"))
    weight = first.weight
    with torch.no_grad():
        first.weight = torch.nn.Parameter(weight.double())
    with pytest.raises(native.AbiMismatch, match=r"parameter 0: dtype torch\.float64"):
        steps.run(x, y, None, 0, 1, torch.zeros(()))
    first.weight = weight
    steps.optimizer.state[weight]["exp_avg"] = torch.zeros(3, 2)
    with pytest.raises(native.AbiMismatch, match=r"parameter 0's exp_avg: shape \(3, 2\)"):
        steps.run(x, y, None, 0, 1, torch.zeros(()))
    del steps.optimizer.state[weight]["exp_avg"]
    with pytest.raises(native.AbiMismatch, match="parameter 0 has no optimizer state 'exp_avg'"):
        steps.run(x, y, None, 0, 1, torch.zeros(()))


def test_pointers_are_read_at_each_call_not_captured_once():
    steps = steps_for()
    x, y = data()
    steps.run(x, y, None, 0, 2, torch.zeros(()))
    first = next(iter(steps.model.get_submodule("net").parameters()))
    replaced = steps.optimizer.state[first]["step"]
    # A restored checkpoint replaces the optimizer's state tensors with new ones.
    steps.optimizer.load_state_dict(copy.deepcopy(steps.optimizer.state_dict()))
    assert steps.optimizer.state[first]["step"] is not replaced
    steps.run(x, y, None, 2, 5, torch.zeros(()))
    assert float(steps.optimizer.state[first]["step"]) == 5  # torch's tensors now were updated...
    assert float(replaced) == 2  # ...and not the ones it held before the restore


def test_the_library_carries_its_abi_record_and_a_foreign_one_is_refused():
    steps = steps_for(batch_size=4)
    steps.abi.check_library(steps.library)
    other = steps_for(batch_size=3)
    with pytest.raises(NativeUnavailable, match="ABI record"):
        other.abi.check_library(steps.library)


# -- the serving boundary: RowwiseForward.__call__ ------------------------------------------------------


def test_a_wrong_array_at_the_serving_boundary_raises():
    spec = S.TrainSpec.model_validate({"model": LAYERS, "loss": "CrossEntropyLoss"})
    forward = native.RowwiseForward(network.TabularNet(spec.model, 2).eval(), spec.model, 2, "classification")
    x = np.zeros((4, 2), dtype=np.float32)
    assert forward(x).shape == (4, 2)
    wrong = {
        "float64": (x.astype(np.float64), "x: dtype float64"),
        "too wide": (np.zeros((4, 3), dtype=np.float32), r"x: shape \(4, 3\)"),
        "one row as a vector": (np.zeros(2, dtype=np.float32), r"x: shape \(2,\)"),
        "Fortran order": (np.asfortranarray(np.ones((4, 2), dtype=np.float32)), "not C-contiguous"),
        "a list": ([[0.0, 0.0]], "expected a numpy array"),
    }
    for value, message in wrong.values():
        with pytest.raises(native.AbiMismatch, match=message):
            forward(value)  # type: ignore[arg-type]
    forward._flat = forward._flat.double()  # as a bug would
    with pytest.raises(native.AbiMismatch, match=r"the weights: dtype torch\.float64"):
        forward(x)
    forward._flat = forward._flat[:-1].float()
    with pytest.raises(native.AbiMismatch, match=r"the weights: shape \(35,\), the generated code needs \(36,\)"):
        forward(x)


# -- the compile cache ----------------------------------------------------------------------------------


def unique_source() -> str:
    spec = S.TrainSpec.model_validate({"model": [linear(3), "Softplus", linear(2)], "loss": "CrossEntropyLoss"})
    source, _ = native.generate(spec, 5, "classification")
    return source + f"// {new_id()}\n"  # a source no other test or process has compiled yet


def test_the_cache_is_private_and_each_library_is_checked_against_its_digest(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRAINSERVE_NATIVE_CACHE_DIR", str(cache))
    source = unique_source()
    library, cached = native.ensure_compiled(source)
    assert not cached
    assert cache.stat().st_mode & 0o777 == 0o700
    digest = library.with_name(library.name + ".sha256")
    assert digest.read_text().strip() == native._sha256(library)
    assert native.ensure_compiled(source) == (library, True)
    library.write_bytes(library.read_bytes() + b"tampered")  # a mismatch: compiled again, never loaded
    assert native.ensure_compiled(source) == (library, False)
    assert digest.read_text().strip() == native._sha256(library)
    digest.unlink()  # no digest: compiled again
    assert native.ensure_compiled(source) == (library, False)
    cache.chmod(0o777)
    with pytest.raises(NativeUnavailable, match="writable by group or others"):
        native.ensure_compiled(source)


def test_the_cache_key_holds_the_compiler_version_the_machine_and_the_flags(monkeypatch):
    assert "-ffp-contract=off" in native.CFLAGS
    assert not any("fast-math" in flag or flag == "-Ofast" for flag in native.CFLAGS)
    source = unique_source()
    compiler = native.compiler()
    here = native.cached_library(source, compiler)
    monkeypatch.setattr(native, "compiler_identity", lambda path: "cc (a newer one) 99.0")
    upgraded = native.cached_library(source, compiler)
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    elsewhere = native.cached_library(source, compiler)
    assert len({here, upgraded, elsewhere}) == 3


def test_settings_switch_the_native_path_off_and_name_the_compiler(monkeypatch):
    x, y = moons(40)
    monkeypatch.setenv("TRAINSERVE_NATIVE", "false")
    _, _, result = fit(x, y, epochs=1, model=LAYERS)
    assert result.loop == "eager"
    assert (
        result.notes[0]
        == "training loop: eager PyTorch (the native path is off on this worker (TRAINSERVE_NATIVE=false))"
    )
    spec = S.TrainSpec.model_validate({"model": LAYERS, "loss": "CrossEntropyLoss"})
    with pytest.raises(NativeUnavailable, match="the native path is off"):
        native.RowwiseForward(network.TabularNet(spec.model, 2).eval(), spec.model, 2, "classification")
    monkeypatch.setenv("TRAINSERVE_NATIVE", "true")
    monkeypatch.setenv("TRAINSERVE_NATIVE_COMPILER", "/nonexistent/cc")
    _, _, result = fit(x, y, epochs=1, model=LAYERS)
    assert result.loop == "eager"
    assert "'/nonexistent/cc' (TRAINSERVE_NATIVE_COMPILER) is not found" in result.notes[0]


# -- what the generated code assumes of torch --------------------------------------------------------------

OPTIMIZER_LAYOUTS: list[tuple[Any, set[str]]] = [
    ("SGD", set()),
    ({"type": "SGD", "momentum": 0.9}, {"momentum_buffer"}),
    ("Adam", {"step", "exp_avg", "exp_avg_sq"}),
    ({"type": "Adam", "amsgrad": True}, {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    ({"type": "AdamW", "amsgrad": True}, {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    ("RMSprop", {"step", "square_avg"}),
    ({"type": "RMSprop", "momentum": 0.5, "centered": True}, {"step", "square_avg", "momentum_buffer", "grad_avg"}),
    ("Adagrad", {"step", "sum"}),
]


# Ids name the optimizer only: a set's repr follows the hash seed, which differs between the
# processes of a parallel run, and they must all collect the same test ids.
@pytest.mark.parametrize(("optimizer", "slots"), OPTIMIZER_LAYOUTS, ids=[str(o)[:40] for o, _ in OPTIMIZER_LAYOUTS])
def test_torch_keeps_the_optimizer_state_the_native_code_assumes(optimizer, slots):
    """A torch upgrade that renames, adds, drops or re-types a state slot, or reorders a
    module's parameters, fails here before the generated code reads the wrong memory."""
    spec = S.TrainSpec.model_validate(
        {
            "model": [linear(3), "Tanh", {"type": "Linear", "out_features": 2, "bias": False}],
            "loss": "MSELoss",
            "optimizer": optimizer,
        }
    )
    net = network.TabularNet(spec.model, 2).net
    assert [name for name, _ in net.named_parameters()] == ["0.weight", "0.bias", "2.weight"]
    abi = native.train_abi(spec, 2, "regression")
    assert [tuple(p.shape) for p in net.parameters()] == list(abi.param_shapes) == [(3, 2), (3,), (2, 3)]
    assert set(abi.slots) == slots
    torch_optimizer = loop.build_optimizer(spec.optimizer, net.parameters())
    net(torch.randn(4, 2)).square().sum().backward()
    torch_optimizer.step()  # torch's own first step creates its state
    for p in net.parameters():
        state = torch_optimizer.state[p]
        assert set(state) == slots
        for slot in abi.slots:
            t = state[slot]
            assert t.dtype == torch.float32
            assert t.device.type == "cpu"
            assert t.is_contiguous()
            assert tuple(t.shape) == abi.slot_shape(slot, tuple(p.shape))
    # And the state the native loop creates before its first step is torch's own layout.
    fresh = loop.build_optimizer(spec.optimizer, net.parameters())
    native._init_state(fresh, abi.slots)
    for p in net.parameters():
        assert {k: (v.dtype, v.shape) for k, v in fresh.state[p].items()} == {
            k: (v.dtype, v.shape) for k, v in torch_optimizer.state[p].items()
        }
