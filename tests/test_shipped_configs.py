"""Every shipped config resolves to exactly the values recorded in tests/data/resolved_configs/ (the
schema's defaults, the file's `base:` chain and its own values, merged), so turning a recipe into a
base plus a small overlay, or moving a default, cannot change a value unnoticed.

After a deliberate change, rewrite the records and review their diff:
    PYTHONPATH=. python tests/test_shipped_configs.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from aimv2.compress.config import CompressConfig
from aimv2.config import PretrainConfig, merge_config
from aimv2.probe.config import ProbeConfig
from aimv2.probe.suite import SuiteConfig

REPO = Path(__file__).resolve().parents[1]
RECORDS = REPO / "tests" / "data" / "resolved_configs"
# configs/<kind>/ -> the schema its files fill (strategy presets are overlays of a pre-training config)
SCHEMAS = {"pretrain": PretrainConfig, "probe": ProbeConfig, "compress": CompressConfig, "strategy": PretrainConfig}
SHIPPED = [(kind, path) for kind in SCHEMAS for path in sorted((REPO / "configs" / kind).glob("*.yaml"))]


def schema_of(kind: str, path: Path) -> type:
    """configs/probe/suite_*.yaml are `aimv2 probe suite` files (several data sets), not probe configs."""
    return SuiteConfig if kind == "probe" and path.name.startswith("suite_") else SCHEMAS[kind]


def resolved_yaml(kind: str, path: Path) -> str:
    return OmegaConf.to_yaml(merge_config(path, schema=schema_of(kind, path)))


@pytest.mark.parametrize("kind,path", SHIPPED, ids=lambda v: v if isinstance(v, str) else v.stem)
def test_shipped_config_resolves_to_its_recorded_values(kind, path):
    record = RECORDS / kind / path.name
    assert record.is_file(), f"no record of {path.relative_to(REPO)}: run {__doc__.splitlines()[-1].strip()}"
    assert resolved_yaml(kind, path) == record.read_text(encoding="utf-8")


def test_every_record_has_its_config():
    shipped = {(kind, p.name) for kind, p in SHIPPED}
    recorded = {(p.parent.name, p.name) for p in RECORDS.glob("*/*.yaml")}
    assert recorded <= shipped, f"records of configs no longer shipped: {sorted(recorded - shipped)}"


def test_the_paper_recipes_are_overlays_of_the_large_224_recipe():
    """huge/1b/3b at 224 and the 336/448 stages say only what differs from their base."""
    for name in ("aimv2_huge_224", "aimv2_1b_224", "aimv2_3b_224", "aimv2_large_336", "aimv2_large_448"):
        text = (REPO / "configs" / "pretrain" / f"{name}.yaml").read_text(encoding="utf-8")
        values = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        assert values[0].startswith("base: ") and len(values) <= 16, name


if __name__ == "__main__":
    for kind, path in SHIPPED:
        out = RECORDS / kind / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(resolved_yaml(kind, path), encoding="utf-8")
        print(f"recorded {out.relative_to(REPO)}", file=sys.stderr)
