"""Imports flow one way: data -> training -> checkpoint -> export -> model store -> service.

Read from the source (the AST of every module, so imports inside functions and under
``TYPE_CHECKING`` count too), not from ``sys.modules`` after an import:

* ``bbservice/`` (the library: models, cells, checkpoints, vocabulary, runtime) imports neither
  ``training/`` nor ``export/``, and nothing below the service imports ``bbservice.service``;
* ``training/`` does not import ``export/``;
* no module imports itself through a circle of imports.

``bbservice/cli.py`` names each command's module as a string (imported when that command runs):
a table of commands, not an import, so the layers below never depend on it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bbservice", "training", "export")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _target(name: str) -> str | None:
    """The project module an import of ``name`` loads (the longest known prefix)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def imports_of(module: str) -> set[str]:
    """Every project module ``module`` imports, anywhere in its body."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from a import b``: the submodule a.b where there is one, else a itself
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _target(name)
            if target and target != module:
                found.add(target)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def _layer(module: str) -> str:
    if module.startswith("bbservice.service"):
        return "service"
    return module.split(".")[0]


# what each layer may import (besides itself)
ALLOWED = {
    "bbservice": {"bbservice"},
    "training": {"bbservice", "training"},
    "export": {"bbservice", "training", "export"},
    "service": {"bbservice", "service"},
}


def test_the_graph_is_read():
    assert "bbservice.checkpoints" in GRAPH["training.train_music"]
    assert "bbservice.service.app" in GRAPH["bbservice.service"]
    assert len(GRAPH) >= 40


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_down(module):
    layer = _layer(module)
    upward = sorted(t for t in GRAPH[module] if _layer(t) not in ALLOWED[layer])
    assert not upward, f"{module} ({layer}) imports {upward}"


def _cycle_from(start: str) -> list[str] | None:
    """A circle of imports through ``start``, if any (depth-first search)."""
    stack = [(start, [start])]
    seen = set()
    while stack:
        node, path = stack.pop()
        for nxt in GRAPH[node]:
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_circular_imports(module):
    cycle = _cycle_from(module)
    assert cycle is None, " -> ".join(cycle)


def test_the_test_sees_lazy_and_upward_imports(tmp_path, monkeypatch):
    """The checks read imports inside functions (what ``sys.modules`` cannot show)."""
    fake = ROOT / "bbservice" / "_layering_probe.py"
    assert not fake.exists()
    source = "def f():\n    from training import common\n    return common\n"
    monkeypatch.setitem(MODULES, "bbservice._layering_probe", tmp_path / "probe.py")
    (tmp_path / "probe.py").write_text(source)
    found = imports_of("bbservice._layering_probe")
    assert "training.common" in found
    assert _layer("bbservice._layering_probe") == "bbservice"
    assert not {_layer(t) for t in found} <= ALLOWED["bbservice"]
