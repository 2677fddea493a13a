"""`aimv2 demo`: the main job on an embedded default, offline: write the demo shards (real digit
scans shipped inside scikit-learn), pre-train the debug size on them, and say where everything is."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "offline demo: build the demo shards, pre-train the debug size, probe it, report the results"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="directory for the demo data and run (default runs/demo)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides of configs/pretrain/debug.yaml, e.g. trainer.max_steps=50")


def run(args: argparse.Namespace) -> int:
    from aimv2.config import load_config
    from aimv2.data.demo import build_demo_shards
    from aimv2.errors import UserError
    from aimv2.training.pretrain import pretrain
    from aimv2.training.report import loss_trend

    config = CONFIGS / "pretrain" / "debug.yaml"
    if not config.is_file():
        raise UserError(f"demo config not found: {config} (run the demo from a source checkout)")
    out = Path(args.out)
    demo = build_demo_shards(out / "data")
    print(f"demo shards: {demo['pretrain']['count']} image-caption pairs in {demo['pretrain']['dir']}")
    overrides = [f"data.sources=[{{name: demo_digits, urls: '{demo['pretrain']['urls']}'}}]",
                 f"run_dir={out / 'pretrain'}", *args.overrides]
    paths = pretrain(load_config(config, overrides))
    print(loss_trend(paths["metrics"]))
    # Frozen-trunk probe of the last checkpoint on the held-out digits (cached mode, configs/probe/quick.yaml).
    from aimv2.probe.config import ProbeConfig
    from aimv2.probe.run import run_probe

    probe_cfg = load_config(CONFIGS / "probe" / "quick.yaml", [
        f"checkpoint={paths['checkpoints'] / 'last.ckpt'}", f"data.train={demo['probe_train']['dir']}",
        f"data.val={demo['probe_val']['dir']}", f"run_dir={out / 'probe'}", "accelerator=cpu"], schema=ProbeConfig)
    run_probe(probe_cfg)
    return 0
