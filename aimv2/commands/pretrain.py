"""`aimv2 pretrain CONFIG [--strategy PRESET] [--rehearse] [key=value ...]`: pre-train with the AIMv2 objective.

`--strategy` merges a scale-out preset over the config, before the overrides: a name of
configs/strategy/ (ddp, fsdp, deepspeed_zero2, deepspeed_zero3, deepspeed_zero3_offload; shipped inside
the package, aimv2.shipped) or a YAML file path. `--rehearse` runs the config as it is, shrunk to the
debug size on this machine's CPU for a few steps with a checkpoint and a resume
(aimv2.engine.rehearsal), and reports what could and could not be rehearsed here. Options and
overrides may come in any order.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aimv2.commands import add_rehearse_arguments
from aimv2.errors import UserError

HELP = "pre-train an AIMv2 encoder from a YAML config (key=value overrides)"
REHEARSE_HELP = (
    "run the config as it is, shrunk to the debug size on this machine's CPU for a few steps with "
    "a checkpoint and a resume; reports what could not be rehearsed here (FSDP and DeepSpeed need CUDA)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. configs/pretrain/debug.yaml")
    parser.add_argument(
        "--strategy",
        metavar="PRESET",
        help="scale-out preset: ddp, fsdp, deepspeed_zero2, deepspeed_zero3, "
        "deepspeed_zero3_offload (configs/strategy/), or a YAML path",
    )
    add_rehearse_arguments(parser, REHEARSE_HELP)
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. trainer.max_steps=100 data.batch_size=32"
    )
    parser.set_defaults(_overrides="overrides")


def strategy_preset(name: str) -> Path:
    """A preset's name (the shipped configs/strategy/NAME.yaml) or a YAML path."""
    from aimv2.shipped import strategy_presets, user_config

    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return user_config(path)
    presets = strategy_presets()
    if name not in presets:
        raise UserError(f"--strategy: no preset {name!r} (known: {', '.join(presets)}; or give a YAML path)")
    return presets[name]


def run(args: argparse.Namespace) -> int:
    from aimv2.config import load_config
    from aimv2.shipped import user_config

    files = [user_config(args.config)] + ([strategy_preset(args.strategy)] if args.strategy else [])
    cfg = load_config(files, args.overrides)
    if args.rehearse:
        from aimv2.pretraining.rehearse import rehearse_pretrain

        name = Path(args.config).stem + (f"+{Path(args.strategy).stem}" if args.strategy else "")
        report = rehearse_pretrain(
            cfg,
            Path(args.rehearse_dir) / name,
            devices=args.rehearse_devices,
            demo_root=args.rehearse_dir,
            in_process=True,
        )
        print(report.table())
        return 1 if report.failed else 0
    from aimv2.pretraining.pretrain import pretrain

    pretrain(cfg)
    return 0
