"""omotool's modules import one another without cycles.

Every ``import`` between omotool's modules counts, wherever it stands (top level, inside a
function, under ``if TYPE_CHECKING``): a cycle hidden in a function body is still two modules
that each need the other. ``from omotool.x import y`` is an edge to ``omotool.x.y`` when ``y``
is a submodule, else to ``omotool.x``; relative imports are resolved against the importing
module's package. Importing ``omotool.x.y`` also runs the package ``omotool.x``; that implicit
step is not an edge (a package that imports its own submodules is not a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import omotool

PACKAGE = Path(omotool.__file__).parent
# Cycles inside packages rewritten elsewhere, listed here until that rewrite lands (each as
# its modules, sorted): none known today.
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def module_names() -> dict[str, Path]:
    """``omotool.a.b`` → its file, for every module and package under omotool/."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The omotool modules that the module ``name`` (file ``path``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return {target for target in found if target in modules and target != name}


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    """The imports that hold ``component`` together, ``a -> b`` one per line."""
    members = set(component)
    edges = [f"  {a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return "\n".join([", ".join(component), *edges])


def test_the_import_graph_is_found() -> None:
    graph = import_graph()
    assert "omotool.eval.runner" in graph["omotool.cli"]  # an import inside a function
    assert "omotool.errors" in graph["omotool.registry"]  # a top-level from-import
    assert "omotool.eval.suite" in graph["omotool.eval.runner"]


def test_relative_and_submodule_imports_resolve(tmp_path) -> None:
    modules = {name: tmp_path / f"{name}.py" for name in ("omotool.a", "omotool.a.b", "omotool.c")}
    source = tmp_path / "source.py"
    source.write_text(
        "from . import c\ndef f():\n    from .a import b\n    import omotool.a\n"
        "from omotool.a import thing\n"
    )
    assert imports_of("omotool.x", source, modules) == {"omotool.c", "omotool.a.b", "omotool.a"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = [c for c in cycles(graph) if tuple(c) not in KNOWN_CYCLES]
    assert not found, "import cycles:\n" + "\n".join(describe(c, graph) for c in found)
