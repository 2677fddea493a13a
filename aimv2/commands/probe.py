"""`aimv2 probe [CONFIG] --checkpoint CKPT --train DIR --val DIR [key=value ...]`: freeze a pre-trained
encoder and train a grid of classification heads on it; prints every head's top-1/top-5 on val.

The config file is optional: without one the defaults are the quick cached mode
(`configs/probe/quick.yaml` spells them out; `configs/probe/imagenet_attentive.yaml` is the paper's
protocol). Flags override the file; `key=value` overrides everything.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "frozen-trunk probe: train a grid of attentive/linear heads on a frozen encoder, report top-1/top-5"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", metavar="[CONFIG] key=value",
                        help="an optional YAML config (e.g. configs/probe/imagenet_attentive.yaml), then overrides "
                             "such as optim.epochs=10 mode=augmented head.kinds=[linear]")
    parser.add_argument("--checkpoint", help="any checkpoint aimv2.load_encoder reads (an `aimv2 pretrain` .ckpt such as "
                        "runs/demo/pretrain/checkpoints/last.ckpt, a ZeRO directory, an export, a timm or transformers "
                        "directory, Apple's release)")
    parser.add_argument("--train", help="train split: class folders (DIR/<class>/<images>) or class shards (DIR with classes.json)")
    parser.add_argument("--val", help="val split, same layout and classes as --train")
    parser.add_argument("--out", help="run directory (default: <checkpoint's run>/probe)")
    parser.add_argument("--mode", choices=("cached", "augmented"), help="cached (default): features once; augmented: the paper's")
    parser.add_argument("--devices", type=int, help="processes, one per device (default 1): feature extraction, or augmented training")
    parser.set_defaults(_overrides="items")  # overrides may also follow the options (aimv2.cli.parse_args)


def split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """The first item is the config file when it is not a key=value override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, list(items)


def run(args: argparse.Namespace) -> int:
    from aimv2.config import load_config
    from aimv2.errors import UserError
    from aimv2.probe.config import ProbeConfig
    from aimv2.probe.run import run_probe
    from aimv2.shipped import user_config

    config, overrides = split_items(args.items)
    config = None if config is None else str(user_config(config))
    if config is not None and not Path(config).is_file():
        raise UserError(f"config file not found: {config} (overrides are written key=value)")
    flags = {"checkpoint": args.checkpoint, "data.train": args.train, "data.val": args.val,
             "run_dir": args.out, "mode": args.mode, "devices": args.devices}
    from_flags = [f"{key}={_quote(value)}" for key, value in flags.items() if value is not None]
    cfg = load_config(config, [*from_flags, *overrides], schema=ProbeConfig)
    run_probe(cfg)
    return 0


def _quote(value) -> str:
    """A path as a YAML string (so '{00000..00009}' and ':' stay literal)."""
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"
