"""The package layout as a rule, read from the source with `ast` (every import, at module level or
inside a function): no import circle, imports only down the layers (docs/architecture.md), and no
module outside methods/ that names a method."""

from __future__ import annotations

import ast
from pathlib import Path

import adamix
from adamix.methods import names
from adamix.methods.kinds import SUFFIXES

SRC = Path(adamix.__file__).parent

# Lower numbers are lower layers. A module may import from its own package and from lower layers;
# the three paths (compression, serve, export) share what they need through io, methods and quant.
LAYERS = {
    "errors": 0, "timing": 0, "memory": 0, "version": 0, "threads": 0,
    "quant": 1,
    "methods": 2,
    "io": 3,
    "compression": 4, "serve": 4, "export": 4,
    "eval": 5,
    "cli": 6, "__init__": 6,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The adamix modules that `name` imports (a package import counts as its __init__)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports(n, p, set(mods)) for n, p in mods.items()}


def top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer():
    assert {top(n) for n in modules()} <= set(LAYERS)


def test_no_import_circle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)


def test_imports_point_down_the_layers():
    bad = []
    for n, targets in graph().items():
        for t in targets:
            a, b = top(n), top(t)
            if a != b and LAYERS[b] >= LAYERS[a] and not (a == "__init__"):
                bad.append(f"{n} -> {t}")
    assert not bad, "imports that run up a layer or across paths: " + ", ".join(sorted(bad))


def named_methods(tree: ast.AST, wanted: set[str], keys: set[str] = frozenset()) -> list[tuple[int, str]]:
    """(line, name) where code branches on or looks up one of `wanted`: a comparison with it (==, in,
    also inside a tuple or set) or a subscript by it; and a dict keyed by one of `keys` (a table per
    method). Docstrings and messages are text, not code, and are not looked at."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
        elif isinstance(node, ast.Dict):
            found += [(node.lineno, k.value) for k in node.keys if isinstance(k, ast.Constant) and k.value in keys]
            continue
        elif isinstance(node, ast.Subscript):
            parts = [node.slice]
        else:
            continue
        for part in parts:
            found += [(node.lineno, c.value) for c in ast.walk(part)
                      if isinstance(c, ast.Constant) and c.value in wanted]
    return found


def test_no_method_is_named_outside_methods():
    """Outside methods/, no code compares with, or looks up by, a method or stored-kind name, and no
    table is keyed by method names."""
    wanted = set(names()) | set(SUFFIXES)
    assert {"deltacome", "bitdelta", "svd-mixed", "raw"} <= wanted  # the check has teeth
    found = [f"{path.relative_to(SRC)}:{line}: {value!r}"
             for name, path in modules().items() if top(name) != "methods"
             for line, value in named_methods(ast.parse(path.read_text()), wanted, set(names()))]
    assert not found, "method names outside methods/: " + "; ".join(found)


def test_the_checks_see_a_planted_violation(tmp_path):
    """The import parser and the name scan find what they look for (a checker that finds nothing
    because it reads nothing would pass everything)."""
    g = graph()
    assert "adamix.methods.registry" in g["adamix.methods.adamix"]
    assert "adamix.io.artifact" in g["adamix.export.merge"]
    tree = ast.parse('def f(m, e):\n    """bitdelta, in a docstring"""\n    u = {"lowrank": 1}[m]\n'
                     '    return m in ("rtn", "x") or e["kind"] == "raw" or f"{m} bitdelta"\n')
    assert sorted(v for _, v in named_methods(tree, set(names()) | set(SUFFIXES), set(names()))) == ["lowrank", "raw", "rtn"]


def test_no_package_hides_a_module_behind_a_name():
    """`import adamix.x.y as m` must give the module y: a package that re-exports a function named
    like one of its modules (adamix.compress the function vs a compress/ package) breaks that."""
    import importlib
    hidden = []
    for name in sorted(modules()):
        if "." not in name:
            continue
        parent, _, child = name.rpartition(".")
        module = importlib.import_module(name)
        if getattr(importlib.import_module(parent), child) is not module:
            hidden.append(name)
    assert not hidden, f"shadowed by a re-exported name: {hidden}"
