"""Ideas that live in one place, read from the source: a second copy would drift from the first."""

from __future__ import annotations

import ast

from tests.test_layering import modules


def calls_to(*names: str) -> dict[str, list[str]]:
    """Modules calling `os.NAME(...)` for any of `names`."""
    found: dict[str, list[str]] = {}
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            f = node.func if isinstance(node, ast.Call) else None
            if isinstance(f, ast.Attribute) and f.attr in names and getattr(f.value, "id", None) == "os":
                found.setdefault(module, []).append(f.attr)
    return found


def test_cores_are_counted_in_hardware_only():
    assert set(calls_to("cpu_count", "sched_getaffinity")) == {"yi_local.hardware"}
