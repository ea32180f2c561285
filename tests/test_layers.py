"""The layers of usseg, read from the source: no import runs up a layer, no two modules import each other.

From low to high: ``usseg_core`` (the pure library) < ``tasks`` (artifact keys and IO, Prefect tasks) <
``orchestration`` (Prefect plumbing: service, runner, settings, publishing, Dask worker preload) < ``flows``
(flows that wire tasks) < ``commands`` (the command line). A module may import its own layer and the layers
below it. Every import counts, also one inside a function: a lazy import hides a cycle, it does not remove
it. Dynamic imports named by a string (``importlib.import_module("usseg_core.heads.picie_train")``, the
head registry's lazy entry points) count too.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("usseg_core", "tasks", "orchestration", "flows", "commands")
LAYERS = ("core", "tasks", "orchestration", "flows", "commands")  # low to high

# Module name (or a package: it covers what is below it) -> layer; the longest match wins. The one place to
# update when files move.
LAYER_OF = {
    "usseg_core": "core",
    "tasks": "tasks",
    "orchestration": "orchestration",
    "flows": "flows",
    "commands": "commands",
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYER_OF:
            return LAYER_OF[".".join(parts[:n])]
    raise AssertionError(f"module {module} has no layer: add its package to LAYER_OF in {__file__}")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=1)
def modules() -> dict[str, Path]:
    """Every project module of the layered packages: dotted name -> file."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")) if (REPO / pkg).is_dir() else ():
            if "__pycache__" not in path.parts:
                found[_module_name(path)] = path
    return found


def _project_module(name: str) -> str | None:
    """The project module that ``name`` (a module, or a name inside one) is, or None for a third party."""
    known = modules()
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _imported_names(module: str, path: Path) -> list[tuple[str, int]]:
    """(dotted name, line) of every import in the module, nested ones included, plus every string argument
    of a call that names a project module (dynamic imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from ..y import z
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names += [(f"{base}.{a.name}", node.lineno) for a in node.names]  # a submodule, or a name in base
        elif isinstance(node, ast.Call):
            names += [(a.value, node.lineno) for a in node.args
                      if isinstance(a, ast.Constant) and isinstance(a.value, str) and _project_module(a.value) == a.value]
    return names


@lru_cache(maxsize=1)
def imports() -> dict[str, dict[str, int]]:
    """importer -> {imported project module: first line}, self-imports left out."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules().items():
        out = graph.setdefault(module, {})
        for name, line in _imported_names(module, path):
            target = _project_module(name)
            if target is not None and target != module:
                out[target] = min(line, out.get(target, line))
    return graph


def upward_imports() -> dict[tuple[str, str], str]:
    """(importer, imported) -> the broken rule, for every import that runs up a layer."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    found = {}
    for importer, targets in imports().items():
        low = layer_of(importer)
        for imported in targets:
            high = layer_of(imported)
            if rank[high] > rank[low]:
                found[(importer, imported)] = f"{low} must not import {high} (layers: {' < '.join(LAYERS)})"
    return found


def import_cycles() -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan), each sorted."""
    graph = imports()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def _cycle_path(group: list[str]) -> str:
    """One closed import path through a cycle's modules, with the lines: 'a (l. 3) -> b (l. 9) -> a'."""
    graph, members = imports(), set(group)
    start = group[0]
    path, seen = [start], {start}
    while True:  # in a strongly connected group every member has an edge to another member
        here = path[-1]
        nxt = sorted(t for t in graph[here] if t in members)
        back = start if start in nxt else next((t for t in nxt if t not in seen), nxt[0])
        path.append(back)
        if back in seen:
            path = path[path.index(back):]
            break
        seen.add(back)
    return " -> ".join(f"{m} (l. {graph[m][path[i + 1]]})" for i, m in enumerate(path[:-1])) + f" -> {path[-1]}"


def test_every_module_has_a_layer_and_parses():
    assert "usseg_core.store" in modules() and "tasks.manifest" in modules()
    for module in modules():
        layer_of(module)
    assert imports()


def test_no_import_runs_up_a_layer():
    found = upward_imports()
    lines = [f"{a} imports {b} (line {imports()[a][b]}): {rule}" for (a, b), rule in sorted(found.items())]
    assert not lines, "\n".join(lines)


def test_no_import_cycle():
    cycles = import_cycles()
    lines = [f"import cycle between {', '.join(g)}: {_cycle_path(g)}" for g in cycles]
    assert not lines, "\n".join(lines) + "\n(lazy imports inside functions count: move the shared piece down)"


def test_the_core_never_imports_prefect():
    found = []
    for module, path in modules().items():
        if layer_of(module) != "core":
            continue
        for name, line in _imported_names(module, path):
            if name.split(".")[0] == "prefect":
                found.append(f"{module} imports {name} (line {line}): usseg_core must never import prefect")
    assert not found, "\n".join(found)


def test_the_checker_sees_lazy_relative_and_dynamic_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import importlib\n\ndef f():\n    from .store import x\n    import tasks.common\n"
                     "    return importlib.import_module('usseg_core.errors')\n", encoding="utf-8")
    names = {n for n, _ in _imported_names("usseg_core.probe", probe)}  # as if it were usseg_core/probe.py
    assert {"usseg_core.store.x", "tasks.common", "usseg_core.errors"} <= names
