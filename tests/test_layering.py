"""Imports point one way: commands on top; pull over the converter; converters, server and chat app
side by side; the core (errors, files, GGUF info, Yi facts, quant table, runtime, store, catalog, fit,
hub, hardware) at the bottom. Read from the source with `ast`, so a lazy import inside a function
counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = ("yi_local", "converters", "tui")

# The first matching prefix names a module's layer; everything else in yi_local is the core.
LAYER_OF = [
    ("yi_local.cli", "commands"), ("yi_local.__main__", "commands"), ("yi_local.commands", "commands"),
    ("yi_local.progress", "commands"), ("yi_local.signals", "commands"),
    ("yi_local.pull", "pull"), ("yi_local.resolve", "pull"), ("yi_local.conversion", "pull"),
    ("yi_local.server", "server"), ("converters", "converters"), ("tui", "tui"),
    ("yi_local", "core"),
]  # fmt: skip
MAY_IMPORT = {
    "core": {"core"},
    "converters": {"core", "converters"},
    "server": {"core", "server"},
    "tui": {"core", "tui"},
    "pull": {"core", "converters", "pull"},
    "commands": {"core", "converters", "server", "tui", "pull", "commands"},
}


def layer(module: str) -> str:
    return next(name for prefix, name in LAYER_OF if module == prefix or module.startswith(prefix + "."))


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(path: Path, module: str) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            out.add(base)
    return {m for m in out if m.split(".")[0] in PACKAGES}


def test_imports_point_one_way():
    wrong = []
    for module, path in sorted(modules().items()):
        for target in sorted(imported(path, module)):
            if layer(target) not in MAY_IMPORT[layer(module)]:
                wrong.append(f"{module} ({layer(module)}) imports {target} ({layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_the_contract_catches_a_wrong_import(tmp_path):
    """The checker itself: a core module importing the converter is found."""
    bad = tmp_path / "store.py"
    bad.write_text("def f():\n    from converters.convert import convert\n")
    assert imported(bad, "yi_local.store") == {"converters.convert"}
    assert layer("converters.convert") not in MAY_IMPORT[layer("yi_local.store")]


def test_test_fixtures_are_not_in_the_wheel():
    assert not (ROOT / "converters" / "synthetic.py").exists()
    assert not any("synthetic" in p.name for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
