"""The core's modules import each other in one direction: no cycles, no private names across modules."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "src" / "ft"


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every ``from ft.x import ...`` / ``import ft.x``, at any depth, except those
    under ``if TYPE_CHECKING:`` (never executed, so they cannot make an import cycle)."""
    found = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_block(node):
            stack.extend(getattr(node, "orelse", []))
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("ft."):
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("ft.")]
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported core module: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for path in sorted(CORE.glob("*.py")):
        name = f"ft.{path.stem}" if path.stem != "__init__" else "ft"
        edges: dict[str, int] = {}
        for module, _names, line in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            target = ".".join(module.split(".")[:2])
            if target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every elementary cycle's nodes, found by a depth-first search from each module."""
    cycles, seen = [], set()

    def visit(start: str, node: str, path: list[str]) -> None:
        for nxt in graph.get(node, {}):
            if nxt == start:
                key = frozenset(path)
                if key not in seen:
                    seen.add(key)
                    cycles.append([*path, start])
            elif nxt not in path and nxt > start:  # each cycle once, from its smallest module
                visit(start, nxt, [*path, nxt])

    for module in sorted(graph):
        visit(module, module, [module])
    return cycles


def test_find_cycles_sees_a_cycle():
    graph = {"ft.a": {"ft.b": 1}, "ft.b": {"ft.c": 3}, "ft.c": {"ft.a": 7}, "ft.d": {"ft.a": 2}}
    assert find_cycles(graph) == [["ft.a", "ft.b", "ft.c", "ft.a"]]
    assert find_cycles({"ft.a": {"ft.b": 1}, "ft.b": {}}) == []


def test_core_modules_import_each_other_without_cycles():
    graph = import_graph()
    assert {"ft.train", "ft.checkpoints", "ft.outputs", "ft.data", "ft.cli"} <= set(graph)
    cycles = find_cycles(graph)
    shown = [" -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(c, c[1:], strict=False)) + f" -> {c[-1]}"
             for c in cycles]
    assert not cycles, "import cycles among src/ft modules:\n" + "\n".join(shown)


KNOWN_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()


def test_no_private_name_is_imported_from_another_core_module():
    problems = []
    for path in sorted(CORE.glob("*.py")):
        for module, names, line in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")
                       and (path.name, module, n) not in KNOWN_PRIVATE_IMPORTS]
            if private and module != f"ft.{path.stem}":
                problems.append(f"{path.name}:{line}: from {module} import {', '.join(private)}")
    assert not problems, "\n".join(problems)
