"""docs/recipe.md and the shipped recipes agree: every table row that names a config key holds, in
its "here" column, the value the L config has; the per-size learning rates match their configs."""

from __future__ import annotations

import re

import pytest
import yaml

from aimv2.config import load_config
from conftest import REPO

RECIPE = REPO / "docs" / "recipe.md"


def table_rows(text: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]


def literal(cell: str):
    """The first backticked value of a cell, as YAML (numbers like 1e-3 as floats)."""
    found = re.search(r"`([^`]+)`", cell)
    assert found, cell
    try:
        return float(found.group(1))
    except ValueError:
        return yaml.safe_load(found.group(1))


def lookup(cfg, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def same(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-4)
    return a == b


def test_every_keyed_row_matches_the_shipped_large_recipe():
    cfg = load_config(REPO / "configs/pretrain/aimv2_large_224.yaml")
    checked = []
    for row in table_rows(RECIPE.read_text()):
        if len(row) == 6 and re.fullmatch(r"`[a-z_]+(\.[a-z_]+)+`", row[1]):
            key = row[1].strip("`")
            assert same(lookup(cfg, key), literal(row[2])), (key, lookup(cfg, key), row[2])
            checked.append(key)
    assert {
        "optim.weight_decay",
        "optim.lr",
        "optim.betas",
        "optim.warmup_steps",
        "trainer.max_steps",
        "data.crop_scale",
        "data.crop_ratio",
        "objective.alpha",
        "data.tokenizer.max_length",
    } <= set(checked)
    # The paper's values, which the table's "here" column must therefore also be (Table A1 / Sec. 2).
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay, cfg.optim.grad_clip) == (1e-3, 1e-5, 1e-4, 1.0)
    assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes == 8192


def test_learning_rate_per_size():
    rows = [r for r in table_rows(RECIPE.read_text()) if len(r) == 4 and r[1].startswith("`configs/pretrain/")]
    assert [r[0] for r in rows] == ["large", "huge", "1b", "3b"]
    for size, path, here, paper in rows:
        cfg = load_config(REPO / path.strip("`"))
        assert cfg.model.size == size
        assert cfg.optim.lr == literal(here) == float(paper), path
