"""`aimv2 ablation [CONFIG] [key=value ...]`: the paper's objective ablation at any scale -- pre-train
the same model with AIMv2, captioning-only and pixel-only objectives, keep its random init, probe
each on held-out tasks over several seeds, and write a table (Markdown, JSON) and a plot.

Without --task it builds the offline set (generated scenes + the demo's digit scans, under OUT/data)
and trains and probes on it with configs/pretrain/ablation.yaml and configs/probe/toy.yaml. With
--task NAME=TRAIN,VAL (repeatable) it trains on CONFIG's data.sources and probes those splits.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

HELP = "objective ablation: AIMv2 vs captioning-only vs pixel-only vs random init, probed over seeds"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "items",
        nargs="*",
        metavar="[CONFIG] key=value",
        help="a pre-training config (default configs/pretrain/ablation.yaml), then overrides "
        "for every variant, e.g. trainer.max_steps=2000",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/ablation"), help="output directory (default runs/ablation)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--variants", nargs="+", help="subset of aimv2 captioning pixel random (default all)")
    parser.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME=TRAIN,VAL",
        help="a probe task: class-labelled train and val splits (repeatable)",
    )
    parser.add_argument("--probe-config", help="probe config (default configs/probe/toy.yaml)")
    parser.add_argument(
        "--probe",
        action="append",
        default=[],
        metavar="key=value",
        help="probe override, e.g. --probe optim.epochs=20 (repeatable)",
    )
    parser.add_argument(
        "--scenes",
        type=int,
        nargs=3,
        default=[6000, 1000, 500],
        metavar=("PRETRAIN", "TRAIN", "VAL"),
        help="offline set: generated scenes for pre-training, probe train and probe val",
    )
    parser.set_defaults(_overrides="items")  # overrides may also follow the options (aimv2.cli.parse_args)


def _task(spec: str):
    from aimv2.ablation.plan import Task
    from aimv2.errors import UserError

    name, _, splits = spec.partition("=")
    train, _, val = splits.partition(",")
    if not (name and train and val):
        raise UserError(f"--task {spec!r}: expected NAME=TRAIN,VAL")
    return Task(name, train, val)


def command_line(args: argparse.Namespace) -> str:
    """The command as it could be typed again (rebuilt from the parsed arguments, defaults spelled out)."""
    words = ["aimv2", "ablation", *args.items, "--out", str(args.out), "--seeds", *map(str, args.seeds)]
    words += ["--variants", *args.variants] if args.variants else []
    for spec in args.task:
        words += ["--task", spec]
    words += ["--probe-config", args.probe_config] if args.probe_config else []
    for item in args.probe:
        words += ["--probe", item]
    words += [] if args.task else ["--scenes", *map(str, args.scenes)]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    from aimv2.ablation.plan import VARIANTS, AblationPlan, check_variants
    from aimv2.ablation.run import offline_data, run_ablation
    from aimv2.commands.probe import split_items
    from aimv2.errors import UserError
    from aimv2.shipped import shipped_config, user_config

    config, overrides = split_items(args.items)
    config = str(user_config(config) if config else shipped_config("pretrain/ablation.yaml"))
    if not Path(config).is_file():
        raise UserError(f"config file not found: {config} (overrides are written key=value)")
    probe_config = str(user_config(args.probe_config) if args.probe_config else shipped_config("probe/toy.yaml"))
    variants = list(args.variants or VARIANTS)
    check_variants(variants)  # before minutes of data writing
    if args.task:
        tasks = [_task(spec) for spec in args.task]
    else:
        sources, tasks = offline_data(args.out / "data", tuple(args.scenes))
        overrides = [*sources, *overrides]
    plan = AblationPlan(
        out=str(args.out),
        pretrain_config=config,
        pretrain_overrides=overrides,
        probe_config=probe_config,
        probe_overrides=list(args.probe),
        tasks=tasks,
        seeds=list(args.seeds),
        variants=variants,
    )
    run_ablation(plan, command=command_line(args))
    out = args.out
    print(
        "\n".join(
            [
                f"ablation finished; everything is under {out}",
                f"  table   {out / 'ablation.md'} and {out / 'ablation.json'}",
                f"  plot    {out / 'ablation.png'}",
                f"  runs    {out / 'runs'}/<variant>/seed<k>/ (pre-training, probe/<task>/)",
            ]
        )
    )
    print((out / "ablation.md").read_text(encoding="utf-8"))
    return 0
