"""`aimv2 demo`: the main job on an embedded default, offline: write the demo shards (real digit
scans shipped inside scikit-learn), pre-train the debug size on them (configs/pretrain/demo.yaml),
probe the frozen encoder and the same architecture at its random initialization (the run's step-0
checkpoint) on the same held-out digits, print both side by side, draw the next-patch predictions
on held-out digits, write the run's report, and say where everything is. The side-by-side numbers
are the evidence that pre-training taught the encoder something: a probe number alone means little
on a toy set."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "offline demo: build the demo shards, pre-train the debug size, probe it, report the results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="directory for the demo data and run (default runs/demo)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="overrides of configs/pretrain/demo.yaml, e.g. trainer.max_steps=50",
    )
    parser.add_argument(
        "--probe",
        action="append",
        default=[],
        metavar="key=value",
        help="override of the probe config (configs/probe/toy.yaml), e.g. --probe optim.epochs=10 (repeatable)",
    )
    parser.set_defaults(_overrides="overrides")


def run(args: argparse.Namespace) -> int:
    import time

    from aimv2.config import load_config
    from aimv2.data.demo import build_demo_shards
    from aimv2.engine.checkpointing import INITIAL_NAME, InitialCheckpoint
    from aimv2.engine.logs import loss_trend
    from aimv2.engine.run_dir import RunDir
    from aimv2.pretraining.pretrain import pretrain
    from aimv2.shipped import shipped_config

    config = shipped_config("pretrain/demo.yaml")
    started = time.perf_counter()
    out = Path(args.out)
    demo = build_demo_shards(out / "data")
    print(f"demo shards: {demo['pretrain']['count']} image-caption pairs in {demo['pretrain']['dir']}")
    # The demo is rerun as a whole: it replaces its previous run (a plain `aimv2 pretrain` refuses to).
    overrides = [
        f"data.sources=[{{name: demo_digits, urls: '{demo['pretrain']['urls']}'}}]",
        f"data.tokenizer.path={demo['vocabulary']}",
        f"run_dir={out / 'pretrain'}",
        "trainer.overwrite=true",
        *args.overrides,
    ]
    cfg = load_config(config, overrides)
    run = pretrain(cfg, callbacks=[InitialCheckpoint(RunDir(cfg.run_dir).checkpoints)])
    print(loss_trend(run.metrics))
    # Frozen-trunk probes on the held-out digits (cached mode, configs/probe/toy.yaml): the last checkpoint,
    # and the step-0 checkpoint (the weights training started from), identically.
    from aimv2.probe.config import ProbeConfig
    from aimv2.probe.run import comparison_markdown, run_probe, write_comparison

    results = {}
    for name, checkpoint, run_dir in (
        ("pre-trained", run.last_checkpoint, out / "probe"),
        ("random init", run.checkpoints / INITIAL_NAME, out / "probe_random_init"),
    ):
        probe_cfg = load_config(
            shipped_config("probe/toy.yaml"),
            [
                f"checkpoint={checkpoint}",
                f"data.train={demo['probe_train']['dir']}",
                f"data.val={demo['probe_val']['dir']}",
                f"run_dir={run_dir}",
                "accelerator=cpu",
                *args.probe,
            ],
            schema=ProbeConfig,
        )
        print(f"probe of the {name} encoder ({checkpoint}):")
        results[name] = run_probe(probe_cfg)
    title = (
        f"Frozen-trunk probes on {results['pre-trained']['val_count']} held-out digits (10 classes), "
        "best head of each kind's grid: the pre-trained encoder (last.ckpt) and the same architecture "
        f"at its random initialization ({INITIAL_NAME}, the weights training started from)."
    )
    comparison = write_comparison(results, out / "probe_comparison", title)
    # Pictures: the prediction grid of the last checkpoint on held-out digits, and the run's report.
    from aimv2.data.demo import heldout_examples
    from aimv2.viz.checkpoint import visualize_checkpoint
    from aimv2.viz.report import write_report

    heldout = heldout_examples(Path(demo["probe_val"]["dir"]), out / "heldout", demo["classes"])
    grid = visualize_checkpoint(run.last_checkpoint, [str(heldout)])
    report = write_report([run.root], run.report)
    minutes, seconds = divmod(round(time.perf_counter() - started), 60)
    print(
        "\n".join(
            [
                f"demo finished; everything is under {out}",
                f"  data         {out / 'data'} (pretrain shards, probe/train, probe/val)",
                f"  checkpoint   {run.last_checkpoint}",
                f"  logs         {run.metrics} (tensorboard --logdir {run.tensorboard})",
                f"  predictions  {run.visualizations}/step=*.png during training; held-out digits: {grid['grid']}",
                f"  report       {report['markdown']} and {report['curves']}",
                f"  probes       {out / 'probe' / 'results.md'} (pre-trained), "
                f"{out / 'probe_random_init' / 'results.md'} "
                f"(random init), side by side in {out / 'probe_comparison.md'}",
                "",
                f"held-out digit top-1 of the frozen encoder ({minutes} min {seconds:02d} s in all):",
                comparison_markdown(comparison),
            ]
        )
    )
    return 0
