"""`aimv2 compress {train,evaluate,plan,export}`: attach a pre-trained encoder to an LLM through a
token compressor, align it on image-caption shards, measure loss and prefill cost per number of
visual tokens M, and export the front end as one bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from aimv2.commands import add_rehearse_arguments
from aimv2.errors import UserError

HELP = "attach the encoder to an LLM through a token compressor: train, evaluate, plan, sweep, export"
REHEARSE_HELP = (
    "run the config as it is, shrunk on this machine's CPU (a debug encoder and a tiny LM stand in "
    "for what is not here) for a few steps with a checkpoint and a resume; reports what could not "
    "be rehearsed here"
)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="compress_verb", required=True, metavar="ACTION")

    train = sub.add_parser(
        "train",
        help="align a compressor (stage 1; stage=2 also trains the LLM) from a config",
        description="Lightning run: RUN/config.yaml, RUN/checkpoints/, RUN/logs/{metrics.csv,tensorboard}",
    )
    train.add_argument("config", help="YAML config, e.g. configs/compress/tiny.yaml")
    train.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. compressor.kind=resampler compressor.num_tokens=4"
    )
    add_rehearse_arguments(train, REHEARSE_HELP)
    train.set_defaults(_compress_run=_run_train, _overrides="overrides")

    ev = sub.add_parser("evaluate", help="held-out caption loss / perplexity per M: table (md, json) and plot (png)")
    ev.add_argument("runs", nargs="+", help="checkpoints or run directories of `aimv2 compress train`")
    ev.add_argument("--val", default="", help="held-out image-caption shards (default: each run's data.val)")
    ev.add_argument(
        "--tokens",
        type=_int_list,
        default=[],
        help="M values for pool/kdv runs, e.g. 1,4,16,64 (other kinds are evaluated at their trained M)",
    )
    ev.add_argument("--out", default="", help="output directory (default: RUN/eval of the first run)")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--num-workers", type=int, default=2)
    ev.add_argument("--max-batches", type=int, default=0, help="stop after this many batches per M (0 = all)")
    ev.add_argument("--device", default="cpu", help="cpu or cuda")
    ev.add_argument(
        "--shuffled",
        action="store_true",
        help="also score each caption against another image of its batch (how much the image tells)",
    )
    ev.set_defaults(_compress_run=_run_evaluate)

    plan = sub.add_parser(
        "plan", help="prefill FLOPs (2 N (Q + M)) and measured latency per M, with and without cached text"
    )
    plan.add_argument("config", help="a compress config (its lm and text.tokenizer sections are used)")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. lm.hidden_size=1024 lm.num_layers=16")
    plan.add_argument("--text-tokens", type=int, default=50, help="Q, text tokens per query (default 50)")
    plan.add_argument("--tokens", type=_int_list, default=[1, 4, 16, 64, 256], help="M values (default 1,4,16,64,256)")
    plan.add_argument(
        "--params",
        type=float,
        default=None,
        help="LLM size N_params for the FLOPs column, e.g. 7e9 (default: the attached LM's)",
    )
    plan.add_argument("--repeats", type=int, default=5, help="timed prefills per cell (median reported)")
    plan.add_argument("--device", default="cpu", help="cpu or cuda")
    plan.add_argument("--out", default="", help="also write plan.md and plan.json here")
    plan.set_defaults(_compress_run=_run_plan, _overrides="overrides")

    sweep = sub.add_parser(
        "sweep",
        help="LMs x M tokens: train and evaluate a compressor per cell, then fit the scaling law (aimv2 scaling vlm)",
        description="Resumable cell by cell; OUT/results.csv and OUT/fit/ (fit.json, frontier.png, "
        "report.md). On a cluster: one SLURM array task per cell (launch/compress_sweep_array.sbatch).",
    )
    sweep.add_argument("config", help="a sweep config, e.g. configs/compress/sweep_tiny.yaml")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. out=runs/sweep tokens=[1,4]")
    sweep.add_argument(
        "--cell",
        default=None,
        metavar="I|auto",
        help="run only cell I (auto: $SLURM_ARRAY_TASK_ID); the fit runs once every cell is done",
    )
    sweep.add_argument(
        "--list",
        action="store_true",
        help="check every cell's config, print the cells and their array indices; run nothing",
    )
    sweep.set_defaults(_compress_run=_run_sweep, _overrides="overrides")

    export = sub.add_parser(
        "export",
        help="write encoder + compressor (+ LM) + config as one bundle directory, "
        "or (--format hf) as a transformers LLaVA directory",
    )
    export.add_argument("run", help="a checkpoint or run directory of `aimv2 compress train`")
    export.add_argument(
        "--format",
        default="aimv2",
        metavar="{aimv2,hf}",
        dest="export_format",
        help="aimv2 (default): this package's bundle (aimv2.compress.load_bundle); hf: model, "
        "processor and chat template that transformers' AutoModelForImageTextToText loads alone "
        "(mlp only)",
    )
    export.add_argument(
        "--out", required=True, help="output directory (must not exist, see --overwrite; written atomically)"
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    export.set_defaults(_compress_run=_run_export)


def run(args: argparse.Namespace) -> int:
    return args._compress_run(args)


def _load(config: str, overrides: list[str]):
    from aimv2.compress.config import CompressConfig
    from aimv2.config import load_config
    from aimv2.shipped import user_config

    return load_config(user_config(config), overrides, schema=CompressConfig)


def _run_train(args: argparse.Namespace) -> int:
    cfg = _load(args.config, args.overrides)
    if args.rehearse:
        from aimv2.compress.rehearse import rehearse_compress

        report = rehearse_compress(
            cfg,
            Path(args.rehearse_dir) / f"compress-{Path(args.config).stem}",
            devices=args.rehearse_devices,
            demo_root=args.rehearse_dir,
            in_process=True,
        )
        print(report.table())
        return 1 if report.failed else 0
    from aimv2.compress.train import train

    train(cfg)
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from aimv2.compress.evaluate import evaluate, evaluation_markdown, resolve_checkpoint
    from aimv2.engine.run_dir import RunDir

    first = RunDir.of_checkpoint(resolve_checkpoint(args.runs[0]))
    out = Path(args.out) if args.out else first.eval if first is not None else Path(args.runs[0]).parent / "eval"
    rows = evaluate(
        args.runs,
        out,
        val=args.val,
        num_tokens=args.tokens,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        max_batches=args.max_batches,
        device=args.device,
        shuffled=args.shuffled,
    )
    print(evaluation_markdown(rows), end="")
    print(f"written: {out / 'results.md'}, {out / 'results.json'}, {out / 'loss_vs_tokens.png'}")
    return 0


def _run_plan(args: argparse.Namespace) -> int:
    from aimv2.compress.cost_plan import plan, plan_markdown, write_plan

    if args.repeats < 1:
        raise UserError("--repeats must be >= 1")
    cfg = _load(args.config, args.overrides)
    rows, facts = plan(cfg.lm, cfg.text, args.text_tokens, args.tokens, args.params, args.repeats, args.device)
    print(plan_markdown(rows, facts), end="")
    if args.out:
        write_plan(rows, facts, args.out)
        print(f"written: {Path(args.out) / 'plan.md'}, {Path(args.out) / 'plan.json'}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from aimv2.compress.bundle import export_bundle
    from aimv2.compress.evaluate import resolve_checkpoint
    from aimv2.compress.module import load_module

    if args.export_format != "aimv2":
        from aimv2.compress.hf_export import run_export

        return run_export(args.run, args.out, args.export_format, args.overwrite)
    if Path(args.out).exists() and not args.overwrite:  # before the (possibly long) load
        raise UserError(f"{args.out} already exists (pass --overwrite to replace it)")
    ckpt = resolve_checkpoint(args.run)
    out = export_bundle(load_module(ckpt), args.out, overwrite=args.overwrite)
    print(f"bundle of {ckpt} written to {out}")
    print(f"load it with: from aimv2.compress import load_bundle; vlm = load_bundle({str(out)!r})")
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    from aimv2.compress.config import SweepConfig
    from aimv2.compress.sweep import array_index, check_cells, describe, run_sweep
    from aimv2.config import load_config
    from aimv2.shipped import user_config

    path = user_config(args.config)
    sweep = load_config(path, args.overrides, schema=SweepConfig)
    if args.list:
        check_cells(sweep, path)  # a cell whose config would not load is an error now, not in its array task
        print(describe(sweep))
        return 0
    if run_sweep(sweep, path, cell=None if args.cell is None else array_index(args.cell)):
        from aimv2.compress.sweep import locked
        from aimv2.scaling.vlm_budget import scale_vlm

        out, fit = Path(sweep.out), sweep.fit
        with locked(out):  # the array tasks that complete the grid together fit one after the other
            scale_vlm(
                out / "results.csv",
                out / "fit",
                text_tokens=fit.text_tokens,
                budgets=fit.budgets or None,
                bootstrap=fit.bootstrap,
                seed=fit.seed,
            )
    return 0
