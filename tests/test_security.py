"""Static guards for the security rules a review would otherwise have to re-check by hand:
nothing in the service unpickles, evaluates or imports what a client sent."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parent.parent / "service"
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
# Bare builtins only: a module's .eval() is torch's switch to inference mode.
UNSAFE_CALLS = {"eval", "exec", "compile", "__import__", "import_module", "importlib.import_module"}


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text())) for path in sorted(SERVICE.rglob("*.py"))]


def _keyword(call: ast.Call, name: str) -> object:
    for keyword in call.keywords:
        if keyword.arg == name and isinstance(keyword.value, ast.Constant):
            return keyword.value.value
    return None


def _called(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        owner = func.value.id if isinstance(func.value, ast.Name) else "?"
        return f"{owner}.{func.attr}"
    return func.id if isinstance(func, ast.Name) else "?"


def test_the_service_is_scanned() -> None:
    assert len(_modules()) > 20


def test_no_pickle_module_is_imported() -> None:
    for path, tree in _modules():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            assert not UNSAFE_MODULES & set(names), f"{path}:{node.lineno} imports {names}"


def test_every_load_refuses_pickles_and_nothing_is_evaluated() -> None:
    for path, tree in _modules():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            called = _called(node)
            where = f"{path}:{node.lineno} {called}"
            assert called not in UNSAFE_CALLS, where
            if called == "torch.load":
                assert _keyword(node, "weights_only") is True, where
            if called == "np.load":
                assert _keyword(node, "allow_pickle") is False, where
