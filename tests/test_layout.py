"""The layout's rules, read from the source: dependencies point one way and pipeline/ has no import circle.

Imports are collected with `ast` from every module, also those inside functions (a lazy import
still makes a circle for the reader, and breaks when it runs at import time elsewhere).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imports_of(path: Path) -> set[str]:
    """Every absolute module name `path` imports (`from a.b import c` counts as a.b.c when that is a module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports (a submodule import is not an import of its package)."""
    modules = {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = imports_of(path) & set(modules)
        # `from pipeline.ingest import dicom` names the submodule, not the package's __init__
        found -= {m for m in found if any(other.startswith(m + ".") for other in found)}
        edges[name] = found - {name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_pipeline_has_no_import_circle() -> None:
    assert cycles(graph("pipeline")) == []


def test_pipeline_and_models_never_import_flows_or_prefect() -> None:
    """flows -> pipeline, models; pipeline -> models (lazily, to load a checkpoint); models -> torch, MONAI only."""
    forbidden = {"pipeline": {"flows", "prefect", "prefect_dask", "medaug"},
                 "models": {"flows", "prefect", "prefect_dask", "medaug", "pipeline"}}
    for package, names in forbidden.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = {m for m in imports_of(path) if m.split(".")[0] in names}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
