"""The core's shape: kernel, engine and developer tools, with imports that only go one way.

- The kernel (``ft.kernel``, ``ft.hookspecs`` and ``ft`` itself) is what plugins and the pipeline are
  made of; it never imports the engine (``ft.engine``: data, training, checkpoints, outputs) nor the
  developer tools (``ft.tools``), nor the pipeline and CLI above them.
- The engine never imports the developer tools.
- No import cycle among ft's modules, counting imports made inside functions.
- No module of the core over 600 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ft

SRC = Path(ft.__file__).resolve().parent
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """The ft modules ``name`` imports anywhere in its source (module level, in functions, under TYPE_CHECKING
    excluded: those are for type checkers only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import ft.kernel.hooks` names the module itself
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}
KERNEL = {n for n in MODULES if n == "ft" or n == "ft.hookspecs" or n.startswith("ft.kernel")}
ENGINE = {n for n in MODULES if n.startswith("ft.engine")}
TOOLS = {n for n in MODULES if n.startswith("ft.tools")}


def test_the_core_is_split_into_kernel_engine_and_tools():
    assert {"ft.kernel.plugins", "ft.kernel.hooks", "ft.kernel.spec", "ft.kernel.config"} <= KERNEL
    assert {"ft.engine.data", "ft.engine.train", "ft.engine.checkpoints", "ft.engine.outputs"} <= ENGINE
    assert {"ft.tools.testing", "ft.tools.tiny", "ft.tools.debug"} <= TOOLS
    top = {n for n in MODULES if n.count(".") == 1 and n not in KERNEL | {"ft.engine", "ft.tools"}}
    assert top <= {"ft.api", "ft.cli", "ft.commands_cache", "ft.run"}, top  # the plugin API, the CLI, the pipeline


def test_the_kernel_never_imports_the_engine_or_the_tools():
    above = {n for n in MODULES if n not in KERNEL}
    bad = {f"{m} imports {t}" for m in KERNEL for t in GRAPH[m] if t in above}
    assert not bad, sorted(bad)


def test_the_engine_never_imports_the_tools_or_the_cli():
    bad = {f"{m} imports {t}" for m in ENGINE for t in GRAPH[m] if t in TOOLS | {"ft.cli", "ft.tools.testing"}}
    assert not bad, sorted(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_counting_imports_inside_functions():
    assert _cycles(GRAPH) == []


def test_the_cycle_check_sees_imports_inside_functions():
    graph = {"a": {"b"}, "b": set()}
    tree = ast.parse("def f():\n    from ft.kernel import plugins\n")
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(tree))
    graph["b"].add("a")
    assert _cycles(graph) == [["a", "b"]]


def test_no_module_of_the_core_is_over_600_lines():
    big = {name: n for name, path in MODULES.items() if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not big, big


def test_the_kernel_stays_small():
    lines = sum(len(MODULES[n].read_text(encoding="utf-8").splitlines()) for n in KERNEL)
    print(f"kernel: {lines} lines in {len(KERNEL)} modules")
    assert lines <= 3400, lines  # issue 24 asked for about 3,000; it was 7,850 lines of flat core before
