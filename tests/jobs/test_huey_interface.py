"""Huey is used through its documented interface only: no module of the package reads,
sets or overrides a private (underscore) attribute of a Huey object. Those move between
Huey releases: 3.5.0 and 3.5.4 name the consumer's signal handling differently, and a
worker that overrode one of them failed on the other.

The check reads the source (an AST walk); how the worker stops is tested on real
processes in test_faults.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import trainserve

PACKAGE = Path(trainserve.__file__).resolve().parent

# What the worker did before it used Huey's documented interface: each marked line must be found.
OVERRIDING_HUEY = """
from huey.consumer import Consumer

class _DrainingConsumer(Consumer):
    def __init__(self, huey, *, on_stop, **options):
        super().__init__(huey, **options)
        self._on_stop = on_stop  # found: an underscore name in Huey's namespace
        self._signal_actions[2] = (False, True)  # found

    def _handle_signal(self, signum, frame):  # found
        super()._handle_signal(signum, frame)  # found
        self._on_stop()  # found

def run(queue, consumer):
    queue.huey._registry  # found
    consumer._stop_flag_timeout = 1  # found
    Consumer._set_signal_handlers(consumer)  # found
    consumer.stop(graceful=True)
"""


def _private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def _name_of(node: ast.AST) -> str:
    """The name an attribute reads or writes, or a method defines; "" for anything else."""
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return node.name
    return ""


def _names(node: ast.AST) -> set[str]:
    """Every variable and attribute name in an expression: ``self.queue.huey`` gives
    ``{"self", "queue", "huey"}``."""
    found: set[str] = set()
    for part in ast.walk(node):
        if isinstance(part, ast.Name):
            found.add(part.id)
        elif isinstance(part, ast.Attribute):
            found.add(part.attr)
    return found


def huey_private_uses(source: str) -> list[int]:
    """The lines of ``source`` that touch a private attribute of a Huey object: one reached
    through a name imported from huey, or through a variable or attribute named ``huey`` or
    ``consumer`` (what this project calls its Huey instance and consumer); and, inside a
    class built on a Huey class, any underscore name of its own, which shares Huey's."""
    tree = ast.parse(source)
    from_huey = {"huey", "consumer"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "huey":
            from_huey.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            from_huey.update(alias.asname or alias.name for alias in node.names if alias.name.split(".")[0] == "huey")
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and _names(node.value) & from_huey:
            lines.add(node.lineno)
        if isinstance(node, ast.ClassDef) and any(_names(base) & from_huey for base in node.bases):
            lines.update(inner.lineno for inner in ast.walk(node) if _private(_name_of(inner)))
    return sorted(lines)


def test_the_check_finds_every_private_huey_use_in_the_old_worker() -> None:
    marked = [number for number, line in enumerate(OVERRIDING_HUEY.splitlines(), 1) if "# found" in line]
    assert len(marked) == 8
    assert huey_private_uses(OVERRIDING_HUEY) == marked


def test_no_module_of_the_package_touches_a_private_attribute_of_huey() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "jobs" / "worker.py" in modules
    found = {
        str(path.relative_to(PACKAGE)): lines
        for path in modules
        if (lines := huey_private_uses(path.read_text(encoding="utf-8")))
    }
    assert found == {}
