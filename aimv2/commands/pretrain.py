"""`aimv2 pretrain CONFIG [key=value ...]`: pre-train with the AIMv2 objective."""

from __future__ import annotations

import argparse

HELP = "pre-train an AIMv2 encoder from a YAML config (key=value overrides)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. configs/pretrain/debug.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. trainer.max_steps=100 data.batch_size=32")


def run(args: argparse.Namespace) -> int:
    from aimv2.config import load_config
    from aimv2.training.pretrain import pretrain

    cfg = load_config(args.config, args.overrides)
    pretrain(cfg)
    return 0
