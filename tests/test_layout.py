"""Code layout: no import cycle through a subpackage of dynasyn.

The graph is read from the source (every ``import`` / ``from … import``, also inside functions;
``if TYPE_CHECKING:`` blocks are skipped, they never run). Each subpackage (augment, micro,
evaluate, …) is one node, each top-level module (dynasyn.train, dynasyn.scene, …) another; a
cycle that passes through a subpackage means two layers that each need the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dynasyn

ROOT = Path(dynasyn.__file__).parent


def _node(module: str, subpackages: set[str]) -> str | None:
    parts = module.split(".")
    if parts[0] != "dynasyn":
        return None
    if len(parts) == 1:
        return "dynasyn"
    return parts[1] if parts[1] in subpackages else "dynasyn." + parts[1]


def _imports(tree: ast.Module, module: str, is_package: bool) -> list[str]:
    for n in ast.walk(tree):
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            n.body = []
    found: list[str] = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            found += [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                pkg = module.split(".")
                pkg = pkg if is_package else pkg[:-1]
                pkg = pkg[: len(pkg) - (n.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            # `from dynasyn import x` may name a submodule: count it as that module
            found += [base] + [f"{base}.{a.name}" for a in n.names if base == "dynasyn"]
    return found


def import_graph(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """``{node: {imported node: ["module -> imported", …]}}`` for the package at ``root``."""
    subpackages = {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        is_package = rel.name == "__init__"
        module = ".".join(rel.parts[:-1] if is_package else rel.parts)
        src = _node(module, subpackages)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for target in _imports(tree, module, is_package):
            dst = _node(target, subpackages)
            if dst is not None and dst not in (src, "dynasyn"):
                graph.setdefault(src, {}).setdefault(dst, []).append(f"{module} -> {target}")
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    pkg = tmp_path / "dynasyn"
    for sub in ("a", "b"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from dynasyn.b.y import f\n")
    (pkg / "b" / "y.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dynasyn.a import x\n"
        "def f():\n    return 1\n"
    )
    assert cycles(import_graph(pkg)) == []  # a TYPE_CHECKING import is not a dependency
    (pkg / "b" / "y.py").write_text("def f():\n    from dynasyn.a.x import g\n")
    assert cycles(import_graph(pkg)) == [["a", "b"]]


def test_no_import_cycle_through_a_subpackage() -> None:
    graph = import_graph()
    subpackages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert {"augment", "micro", "evaluate"} <= subpackages
    bad = [c for c in cycles(graph) if subpackages & set(c)]
    detail = [
        f"{a} -> {b}: {graph[a][b][0]}" for c in bad for a in c for b in c if b in graph.get(a, {})
    ]
    assert not bad, f"import cycles {bad}:\n" + "\n".join(detail)
