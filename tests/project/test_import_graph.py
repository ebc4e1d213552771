"""hv/ and backends/ import each other without circles.

A circle between modules means neither can be understood, tested or replaced alone, and
it is usually hidden behind a lazy import inside a function. So the graph counts *every*
import statement a module executes -- at module level and inside functions alike -- and
leaves out only imports under ``if TYPE_CHECKING:`` (never executed; annotations only).

Nodes are the modules of ``hv`` and ``hv_backends`` (the ``backends/`` folder). ``import
a.b.c`` is an edge to ``a.b.c``; ``from a.b import c`` is an edge to ``a.b.c`` when that
is a module, else to ``a.b`` (the package's ``__init__``). Importing a submodule also runs
its parent packages' ``__init__``; that implicit edge is not counted, because a package
whose ``__init__`` re-exports its own submodules would otherwise always be a circle.
"""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGES = {"hv": ROOT / "hv", "hv_backends": ROOT / "backends"}


def module_files() -> dict[str, Path]:
    """Every module of the checked packages by dotted name (a package is its __init__)."""
    modules: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """All import statements that can execute (skips ``if TYPE_CHECKING:`` bodies)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name of a (possibly relative) ``from ... import``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the checked modules it imports."""
    modules = module_files()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"
        for node in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                source = _absolute(name, is_package, node)
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in modules else source)
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest circle through each strongly connected component of more than one
    module (Tarjan's algorithm, iterative; then a BFS inside the component)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, pending = work[-1]
            if pending:
                nxt = pending.pop(0)
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return [_shortest_circle(graph, component) for component in components]


def _shortest_circle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & members):
            if nxt == start:
                return paths[node] + [start]
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                queue.append(nxt)
    raise AssertionError(f"component {component} has no circle through {start}")


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_graph_sees_what_it_must() -> None:
    """The walker finds real edges: module-level, function-level and package ones, and
    it skips TYPE_CHECKING-only imports."""
    graph = import_graph()
    assert "hv_backends.base" in graph["hv_backends.unicorn"]
    assert "hv.machine.machine" in graph["hv.machine"]                     # __init__ re-export
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import hv.cli\n"
                     "def f():\n    import hv.qmp\n")
    names = [alias.name for node in _imports(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert names == ["hv.qmp"]


def test_cycle_finder_reports_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
