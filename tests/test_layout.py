"""The package layout holds: no package of aimv2 imports one above it (nor one beside it from the
layers that hold jobs or mechanisms), and the import graph between packages has no cycle.

Layers, low to high: errors/fileio/progress/cpu_tuning, models, config, objective/data/checkpoints,
engine, viz, pretraining/compress/probe, ablation, commands, cli. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "aimv2"
LAYER = {"errors": 0, "fileio": 0, "progress": 0, "cpu_tuning": 0, "models": 1, "config": 2, "objective": 3,
         "data": 3, "checkpoints": 3, "engine": 4, "viz": 5, "pretraining": 6, "compress": 6, "probe": 6,
         "ablation": 7, "commands": 8, "cli": 9, "__main__": 10, "__init__": 10}
SIDEWAYS_FROM = 3  # from this layer up, packages of one layer do not import each other


def import_edges() -> tuple[dict[str, set[str]], list[str]]:
    """(package -> the packages it imports, the imports that go up or sideways)."""
    edges: dict[str, set[str]] = defaultdict(set)
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = path.relative_to(PACKAGE).with_suffix("").parts[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aimv2"):
                modules = [node.module]
                if node.module == "aimv2":
                    modules += [f"aimv2.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names if a.name.startswith("aimv2")]
            for module in modules:
                parts = module.split(".")
                if len(parts) < 2 or parts[1] == src or parts[1] not in LAYER:
                    continue
                dst = parts[1]
                edges[src].add(dst)
                mine, theirs = LAYER.get(src, 10), LAYER[dst]
                if theirs > mine or (theirs == mine and theirs >= SIDEWAYS_FROM):
                    bad.append(f"{path.relative_to(PACKAGE.parent)}: {src} -> {dst} ({module})")
    return edges, bad


def test_every_package_has_a_layer():
    names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert names <= set(LAYER), f"give these a layer in tests/test_layout.py: {sorted(names - set(LAYER))}"


def test_no_package_imports_one_above_or_beside_it():
    _, bad = import_edges()
    assert not bad, "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    edges, _ = import_edges()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(path + [node, nxt])}"
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
