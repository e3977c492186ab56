"""The package's import graph: every import (module- or function-level) of every module of
cdae_em, read from the source. No cycle may exist, and imports only go down the layers: a module
imports modules of lower layers, or of its own package."""

from __future__ import annotations

import ast
from pathlib import Path

import cdae_em

PACKAGE = Path(cdae_em.__file__).parent

# bottom to top; a module's layer is that of its longest listed prefix (docs/architecture.md)
LAYERS = [
    ("cdae_em.errors", "cdae_em.settings", "cdae_em.data"),
    ("cdae_em.io",),
    ("cdae_em.runtime",),
    ("cdae_em.core",),
    ("cdae_em.simulate", "cdae_em.denoise"),
    ("cdae_em.classify",),
    ("cdae_em.job",),
    ("cdae_em.commands",),
    ("cdae_em.cli", "cdae_em.data.make_default_map", "cdae_em.data.make_pretrain_structures"),
    ("cdae_em.__main__",),
    ("cdae_em.protocols", "cdae_em.templates", "cdae_em.viewers", "cdae_em.bibtex"),  # framework front ends
]


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (packages by their __init__)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["cdae_em", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module of the package: line of the first such import}."""
    mods = modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "cdae_em":
                    edges.setdefault(target, node.lineno)
                    break
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> tuple[int, str]:
    """(layer, the prefix that placed it) of ``module``. The package's own __init__ is a front end:
    it holds the Scipion plugin hook (and the version, which the graph leaves out)."""
    if module == "cdae_em":
        return len(LAYERS) - 1, "cdae_em"
    best = None
    for number, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (number, prefix)
    assert best is not None, f"{module} is in no layer: add its package to LAYERS (and docs/architecture.md)"
    return best


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    """Imports from a module to one of a higher layer, or to another package of the same layer."""
    found = []
    for module, edges in graph.items():
        (mine, home) = layer_of(module)
        for target, line in edges.items():
            (theirs, other) = layer_of(target)
            if theirs > mine or (theirs == mine and other != home):
                found.append(f"{module} (line {line}) imports {target}")
    return found


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_imports_only_go_down():
    found = upward_imports(import_graph())
    assert found == [], "upward imports:\n" + "\n".join(found)


def test_an_upward_import_is_found():
    graph = {"cdae_em.io.star": {"cdae_em.job.runner": 3}, "cdae_em.job.runner": {"cdae_em.io.star": 1},
             "cdae_em.denoise.stage": {"cdae_em.simulate.simulator": 7}}
    assert upward_imports(graph) == ["cdae_em.io.star (line 3) imports cdae_em.job.runner",
                                     "cdae_em.denoise.stage (line 7) imports cdae_em.simulate.simulator"]


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert len(graph) > 30
    # cli imports the commands at run time only (importlib) and distributed inside main()
    assert any(target.endswith("distributed") for target in graph["cdae_em.cli"])


def test_no_import_cycle():
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
