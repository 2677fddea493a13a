"""`aimv2 probe [CONFIG] --checkpoint CKPT --train DIR --val DIR [key=value ...]`: freeze a pre-trained
encoder and train a grid of classification heads on it; prints every head's top-1/top-5 on val.

`aimv2 probe suite SUITE.yaml [--checkpoint [NAME=]CKPT ...] [--out DIR] [key=value ...]`: the report card,
the probe on every data set of a suite file for one or more encoders side by side (aimv2.probe.suite).

The config file is optional: without one the defaults are the quick cached mode
(`configs/probe/quick.yaml` spells them out; `configs/probe/imagenet_attentive.yaml` is the paper's
protocol). Flags override the file; `key=value` overrides everything.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "frozen-trunk probe: train a grid of attentive/linear heads on a frozen encoder, report top-1/top-5"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "items",
        nargs="*",
        metavar="[CONFIG] key=value",
        help="an optional YAML config (e.g. configs/probe/imagenet_attentive.yaml), then overrides "
        "such as optim.epochs=10 mode=augmented head.kinds=[linear]; or `suite SUITE.yaml` "
        "(e.g. configs/probe/suite_offline.yaml): every data set of a suite, a table of "
        "linear / attentive / kNN top-1",
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        help="any checkpoint aimv2.load_encoder reads (an `aimv2 "
        "pretrain` .ckpt such as runs/demo/pretrain/checkpoints/last.ckpt, a ZeRO directory, an export, "
        "a timm or transformers directory, Apple's release); with `suite`, repeatable as "
        "[NAME=]CKPT: encoders side by side",
    )
    parser.add_argument(
        "--train", help="train split: class folders (DIR/<class>/<images>) or class shards (DIR with classes.json)"
    )
    parser.add_argument("--val", help="val split, same layout and classes as --train")
    parser.add_argument("--out", help="run directory (default: <checkpoint's run>/probe)")
    parser.add_argument(
        "--mode", choices=("cached", "augmented"), help="cached (default): features once; augmented: the paper's"
    )
    parser.add_argument(
        "--devices", type=int, help="processes, one per device (default 1): feature extraction, or augmented training"
    )
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

    if args.items[:1] == ["suite"]:
        return _run_suite(args)
    if args.checkpoint and len(args.checkpoint) > 1:
        raise UserError(
            "--checkpoint is given more than once: one probe probes one encoder "
            "(several side by side: `aimv2 probe suite SUITE.yaml --checkpoint A --checkpoint B`)"
        )
    config, overrides = split_items(args.items)
    config = None if config is None else str(user_config(config))
    if config is not None and not Path(config).is_file():
        raise UserError(f"config file not found: {config} (overrides are written key=value)")
    checkpoint = args.checkpoint[0] if args.checkpoint else None
    flags = {
        "checkpoint": checkpoint,
        "data.train": args.train,
        "data.val": args.val,
        "run_dir": args.out,
        "mode": args.mode,
        "devices": args.devices,
    }
    from_flags = [f"{key}={_quote(value)}" for key, value in flags.items() if value is not None]
    cfg = load_config(config, [*from_flags, *overrides], schema=ProbeConfig)
    run_probe(cfg)
    return 0


def _run_suite(args: argparse.Namespace) -> int:
    """`aimv2 probe suite SUITE.yaml ...`: --checkpoint (repeatable) and --out as documented; --mode and
    --devices become probe overrides of every set; --train/--val belong to a single probe."""
    import shlex

    from aimv2.errors import UserError
    from aimv2.probe.suite import run_suite
    from aimv2.shipped import user_config

    items = args.items[1:]
    if not items or "=" in items[0]:
        raise UserError(
            "aimv2 probe suite: name the suite file first, e.g. `aimv2 probe suite configs/probe/suite_offline.yaml`"
        )
    if args.train or args.val:
        raise UserError(
            "aimv2 probe suite: the data sets come from the suite file's `sets:`; --train/--val are for a single probe"
        )
    path = user_config(items[0])
    if not Path(path).is_file():
        raise UserError(f"suite file not found: {items[0]}")
    flags = [f"mode={args.mode}"] * bool(args.mode) + [f"devices={args.devices}"] * bool(args.devices)
    words = ["aimv2", "probe", "suite", items[0]]
    words += [w for c in args.checkpoint or [] for w in ("--checkpoint", c)] + ["--out", args.out] * bool(args.out)
    words += ["--mode", args.mode] * bool(args.mode) + ["--devices", str(args.devices)] * bool(args.devices)
    run_suite(path, items[1:], args.checkpoint or [], args.out, flags, shlex.join(words + items[1:]))
    return 0


def _quote(value) -> str:
    """A path as a YAML string (so '{00000..00009}' and ':' stay literal)."""
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"
