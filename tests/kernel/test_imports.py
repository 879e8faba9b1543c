"""No private name is imported from another core module (the import rule and the cycle check are in
test_architecture.py)."""

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


KNOWN_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()


def test_no_private_name_is_imported_from_another_core_module():
    problems = []
    for path in sorted(CORE.rglob("*.py")):
        own = ".".join(path.relative_to(CORE.parent).with_suffix("").parts)
        for module, names, line in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")
                       and (path.name, module, n) not in KNOWN_PRIVATE_IMPORTS]
            if private and module != own:
                problems.append(f"{path.name}:{line}: from {module} import {', '.join(private)}")
    assert not problems, "\n".join(problems)
