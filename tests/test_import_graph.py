"""The package's layers: no import cycle anywhere, and nothing below the applications imports the demo.

Every `import` / `from ... import` of every module of `cyclex` counts, at module level or inside a
function, plus `importlib.import_module("cyclex....")` calls with a literal name. An import names a
module edge: `from cyclex.a.b import name` is an edge to `cyclex.a.b.name` when that is a module,
else to `cyclex.a.b` (the parent package's `__init__` runs first in Python, but it is the named
module whose code is used, as import-linter and pydeps count it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cyclex

PACKAGE_DIR = Path(cyclex.__file__).resolve().parent
# The application layer: command line, spec-string parsers, the demo (it hands its scorers in like a user).
APPLICATION_PREFIXES = ("cyclex.cli", "cyclex.__main__", "cyclex.specs", "cyclex.demo")


def _module_files() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = ["cyclex", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """{module: modules of cyclex it imports}, imports inside functions included."""
    modules = modules if modules is not None else _module_files()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(_resolve(alias.name, modules) for alias in node.names if alias.name.startswith("cyclex"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if not source.startswith("cyclex"):
                    continue
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    targets.add(full if full in modules else _resolve(source, modules))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and node.args
                  and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                  and node.args[0].value.startswith("cyclex")):
                targets.add(_resolve(node.args[0].value, modules))
        graph[name] = {t for t in targets if t and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
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
                    cycles.append(sorted(component))
    return cycles


def is_application(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in APPLICATION_PREFIXES)


def test_no_import_cycle_anywhere():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_nothing_below_the_applications_imports_the_demo():
    offenders = {
        module: sorted(t for t in targets if t.startswith("cyclex.demo"))
        for module, targets in import_graph().items()
        if not is_application(module)
    }
    offenders = {m: t for m, t in offenders.items() if t}
    assert not offenders, f"modules below the application layer import cyclex.demo: {offenders}"


def test_the_checks_catch_a_cycle_and_a_demo_import(tmp_path):
    """The two checks fail on a package that breaks them (so they can fail at all)."""
    (tmp_path / "a.py").write_text("def f():\n    from cyclex.b import g\n")
    (tmp_path / "b.py").write_text("import importlib\nimportlib.import_module('cyclex.a')\n")
    (tmp_path / "c.py").write_text("from cyclex.demo import x\n")
    (tmp_path / "demo.py").write_text("x = 1\n")
    modules = {f"cyclex.{p.stem}": p for p in tmp_path.glob("*.py")}
    graph = import_graph(modules)
    assert import_cycles(graph) == [["cyclex.a", "cyclex.b"]]
    assert graph["cyclex.c"] == {"cyclex.demo"} and not is_application("cyclex.c")


# The core: findings vocabulary, atomic writes, JSON lines, image checks, the run lock.
CORE = ("cyclex", "cyclex.findings", "cyclex.atomic_io", "cyclex.jsonl", "cyclex.image_checks", "cyclex.run_lock",
        "cyclex.file_names")


@pytest.mark.parametrize("module", CORE[1:])
def test_core_modules_import_nothing_above_the_core(module):
    graph = import_graph()
    assert graph[module] <= set(CORE), f"{module} imports {sorted(graph[module] - set(CORE))}"
