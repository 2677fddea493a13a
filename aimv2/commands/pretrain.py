"""`aimv2 pretrain CONFIG [--strategy PRESET] [key=value ...]`: pre-train with the AIMv2 objective.

`--strategy` merges a scale-out preset over the config, before the overrides: a name of
configs/strategy/ (ddp, fsdp, deepspeed_zero2, deepspeed_zero3, deepspeed_zero3_offload) or a YAML
file path. It may come before or after CONFIG.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aimv2.errors import UserError

HELP = "pre-train an AIMv2 encoder from a YAML config (key=value overrides)"
STRATEGY_PRESETS = Path(__file__).resolve().parents[2] / "configs" / "strategy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. configs/pretrain/debug.yaml")
    parser.add_argument("--strategy", metavar="PRESET",
                        help="scale-out preset: ddp, fsdp, deepspeed_zero2, deepspeed_zero3, "
                             "deepspeed_zero3_offload (configs/strategy/), or a YAML path")
    # REMAINDER keeps `--strategy X` after CONFIG and among the overrides working (argparse alone cannot).
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                        help="e.g. trainer.max_steps=100 data.batch_size=32")


def split_strategy(items: list[str], strategy: str | None) -> tuple[str | None, list[str]]:
    rest, i = [], 0
    while i < len(items):
        if items[i] == "--strategy" and i + 1 < len(items):
            strategy, i = items[i + 1], i + 2
        elif items[i].startswith("--strategy="):
            strategy, i = items[i].split("=", 1)[1], i + 1
        else:
            rest, i = rest + [items[i]], i + 1
    return strategy, rest


def strategy_preset(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path
    preset = STRATEGY_PRESETS / f"{name}.yaml"
    if not preset.is_file():
        known = ", ".join(sorted(p.stem for p in STRATEGY_PRESETS.glob("*.yaml")))
        raise UserError(f"--strategy: no preset {name!r} (known: {known}; or give a YAML path)")
    return preset


def run(args: argparse.Namespace) -> int:
    from aimv2.config import load_config
    from aimv2.training.pretrain import pretrain

    strategy, overrides = split_strategy(list(args.overrides), args.strategy)
    files = [args.config] + ([strategy_preset(strategy)] if strategy else [])
    cfg = load_config(files, overrides)
    pretrain(cfg)
    return 0
