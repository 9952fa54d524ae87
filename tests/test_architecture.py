"""The shape of the code: layering, import cycles, function length.

Library packages (`students`, `teachers`, `losses`, `kernels`) never import the workbench
glue; no two modules import each other, directly or round a loop (imports inside functions
count: a lazy import hides a cycle, it does not remove it); no module imports another
package's private name; no function outside `kernels/` is longer than 60 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("workbench", "students", "teachers", "losses", "kernels")
LIBRARIES = ("students", "teachers", "losses", "kernels")
MAX_FUNCTION_LINES = 60
LONG_ALLOWED = {("workbench/cli.py", "parser")}  # the argparse table


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The longest known module that `name` (a dotted import target) lies in."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(module: str) -> list[tuple[str, str]]:
    """(imported module, imported name or '') for every import statement of `module`."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:
                out.append((f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base, a.name))
    return out


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _ in imports(module):
            resolved = _resolve(target)
            if resolved is not None and resolved != module:
                edges[module].add(resolved)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_lazy_and_relative_imports():
    assert "students" in MODULES and "workbench.cli" in MODULES
    edges = graph()
    assert all(target in MODULES for targets in edges.values() for target in targets)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("library", LIBRARIES)
def test_library_packages_never_import_the_workbench(library):
    edges = graph()
    bad = sorted(f"{m} -> {t}" for m, ts in edges.items() if m.split(".")[0] == library
                 for t in ts if t.split(".")[0] == "workbench")
    assert not bad, bad


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_no_private_name_crosses_a_package():
    bad = []
    for module in MODULES:
        for target, name in imports(module):
            resolved = _resolve(target)
            if resolved is None or resolved.split(".")[0] == module.split(".")[0]:
                continue
            private = [p for p in [*target.split("."), name] if p.startswith("_") and not p.startswith("__")]
            if private:
                bad.append(f"{module} imports {target}.{name}")
    assert not bad, bad


def _functions(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_functions_fit_on_a_screen():
    long = []
    for module, path in MODULES.items():
        rel = path.relative_to(ROOT).as_posix()
        if module.split(".")[0] == "kernels":
            continue
        long += [f"{rel}:{name} ({n} lines)" for name, n in _functions(path)
                 if n > MAX_FUNCTION_LINES and (rel, name) not in LONG_ALLOWED]
    assert not long, long
