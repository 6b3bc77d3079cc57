"""The import graph of ``lance_lib`` has no cycle, between files or between subpackages.

Every ``import`` and ``from ... import`` is followed, those inside functions and under
``if TYPE_CHECKING:`` included (relative imports resolved), and so are imports by name: a
string literal that is the dotted name of one of the package's modules
(``importlib.import_module("lance_lib.continual")``, or a tuple of such names imported
later). ``from package import
name`` is an edge to the submodule ``package.name`` when that is a module of the package,
else to the package's ``__init__``. Importing ``a.b.c`` is an edge to ``a.b.c`` only (not
to the ``__init__`` files Python runs on the way: those are edges of their own where they
import something).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = "lance_lib"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

Graph = dict[str, set[str]]


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute module name ``from {'.' * level}{target} import ...`` refers to."""
    if level == 0:
        return target or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def imports_of(module: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """The modules of the package that ``module`` (at ``path``) imports, anywhere in it."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        # ``import a.b.c`` where only ``a.b`` is a module of ours (c a name): the longest
        # prefix that is a module
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts:
            found.add(".".join(parts))

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                add(submodule if submodule in modules else source)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and "." in node.value
            and node.value in modules
        ):
            found.add(node.value)  # imported by name
    found.discard(module)
    return found


def import_graph(root: Path = ROOT) -> Graph:
    """``{module: {modules it imports}}`` over the package's files."""
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def subpackage_of(module: str) -> str:
    """The package's direct subpackage holding ``module`` (top-level modules are their own)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def subpackage_graph(graph: Mapping[str, Iterable[str]]) -> Graph:
    """The file graph collapsed onto direct subpackages (self-edges dropped)."""
    out: Graph = {}
    for source, targets in graph.items():
        node = subpackage_of(source)
        out.setdefault(node, set()).update(
            subpackage_of(t) for t in targets if subpackage_of(t) != node
        )
    return out


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def a_cycle(graph: Mapping[str, Iterable[str]], component: list[str]) -> list[str]:
    """One shortest cycle through ``component[0]`` inside the component (for the message)."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph.get(node, ())):
                if target == start:
                    return [*paths[node], start]
                if target in members and target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{component} is not strongly connected")


def describe(graph: Mapping[str, Iterable[str]]) -> str:
    """One line per cycle component: its members and one cycle through them."""
    return "\n".join(
        f"{component}: {' -> '.join(a_cycle(graph, component))}"
        for component in strongly_connected(graph)
    )


def test_checker_finds_cycles_and_resolves_relative_imports(tmp_path):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("from . import b\n")
    (package / "sub" / "b.py").write_text(
        "import importlib\nimportlib.import_module('lance_lib.a')\n"
    )
    (package / "d.py").write_text(
        "'''Mentions lance_lib.a.'''\nNAMES = ('lance_lib.c', 'lance_lib')\n"
    )
    (package / "c.py").write_text("from lance_lib.sub.b import x\n")
    graph = import_graph(package)
    assert graph["lance_lib.a"] == {"lance_lib.sub.b"}
    assert graph["lance_lib.sub"] == {"lance_lib.sub.b"}
    assert graph["lance_lib.c"] == {"lance_lib.sub.b"}
    assert graph["lance_lib.d"] == {"lance_lib.c"}
    assert strongly_connected(graph) == [["lance_lib.a", "lance_lib.sub.b"]]
    assert a_cycle(graph, ["lance_lib.a", "lance_lib.sub.b"]) == [
        "lance_lib.a",
        "lance_lib.sub.b",
        "lance_lib.a",
    ]
    assert strongly_connected(subpackage_graph(graph)) == [["lance_lib.a", "lance_lib.sub"]]


@pytest.mark.parametrize("level", ["file", "subpackage"])
def test_no_import_cycle(level):
    graph = import_graph()
    assert "lance_lib.layers" in graph and "lance_lib.methods.harness" in graph
    if level == "subpackage":
        graph = subpackage_graph(graph)
    cycles = strongly_connected(graph)
    assert not cycles, f"import cycles between {level}s:\n{describe(graph)}"
