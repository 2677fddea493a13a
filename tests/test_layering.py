"""The package layering of docs/architecture.md holds in the code: no package imports one above it or a
peer, so there are no cycles between packages. Every `aimv2` import counts, also those inside functions
(a lazy import is still a dependency). Static: the source is parsed, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# Lower layers first; a unit may import units of lower layers only (and itself). Keep in step with
# docs/architecture.md ("Which package may import which").
LAYERS: list[set[str]] = [
    {"errors"},  # the one-line error every layer raises
    {"fileio", "processes", "progress", "shipped", "objective"},  # foundations
    {"models"},
    {"config"},  # the schema reads the size table
    {"data", "checkpoints"},
    {"engine"},
    {"viz"},
    {"pretraining", "probe", "compress"},  # the jobs: none imports another
    {"ablation", "scaling"},  # studies over many runs of the jobs (scaling fits what compress sweeps make)
    {"commands"},
    {"cli"},  # finds the verbs in commands/ by name (importlib)
    {"__main__"},
]
LAYER = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
FACADE = {"load_encoder", "Preprocessing", "extract_features", "export_checkpoint"}  # aimv2/__init__.py, lazily


def unit_of(module: str) -> str:
    """`aimv2.data.stream` -> `data`; `aimv2.config` -> `config`."""
    return module.split(".")[1]


def imported_units(path: Path) -> set[str]:
    units = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "aimv2":  # `from aimv2 import load_encoder` is the checkpoints API
                units |= {"checkpoints" if a.name in FACADE else a.name for a in node.names}
            elif node.module.startswith("aimv2."):
                units.add(unit_of(node.module))
        elif isinstance(node, ast.Import):
            units |= {unit_of(a.name) for a in node.names if a.name.startswith("aimv2.")}
    return units


def test_no_package_imports_one_above_it_or_a_peer():
    wrong, unknown = [], set()
    for path in sorted((REPO / "aimv2").rglob("*.py")):
        relative = path.relative_to(REPO / "aimv2")
        if relative.as_posix() == "__init__.py":
            continue  # the facade: re-exports the checkpoints API on demand
        source = relative.parts[0].removesuffix(".py")
        for target in imported_units(path) - {source}:
            if source not in LAYER or target not in LAYER:
                unknown |= {u for u in (source, target) if u not in LAYER}
            elif LAYER[target] >= LAYER[source]:
                wrong.append(f"{relative} imports aimv2.{target}")
    assert not unknown, f"place {sorted(unknown)} in a layer: LAYERS in tests/test_layering.py and docs/architecture.md"
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_every_lazy_export_resolves():
    """The packages' lazy public names (module-level __getattr__ tables) point at modules that exist."""
    import importlib

    for package in ("aimv2", "aimv2.compress", "aimv2.checkpoints"):
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", []):
            assert getattr(module, name) is not None, f"{package}.{name}"
