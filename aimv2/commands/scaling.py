"""`aimv2 scaling {vlm,encoder}`: fit a scaling law to results this toolkit made and say what to
deploy (vlm: which LLM size and how many visual tokens for an inference budget) or what to train
(encoder: which encoder size for a pre-training compute budget). The work is in aimv2.scaling."""

from __future__ import annotations

import argparse

HELP = "fit scaling laws: VLM error vs LLM size and visual tokens; encoder loss vs size and compute"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers (e.g. 1e12,1e13), got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="scaling_verb", required=True, metavar="LAW")

    vlm = sub.add_parser(
        "vlm",
        help="fit error = A N^-alpha V^-beta + D to a sweep; inference-optimal (N, V) per budget",
        description="Writes OUT/fit.json, OUT/frontier.png and OUT/report.md.",
    )
    vlm.add_argument(
        "results",
        help="CSV (or JSON list) with columns llm_params, visual_tokens, error "
        "(e.g. the results.csv of `aimv2 compress sweep`)",
    )
    vlm.add_argument("--out", required=True, help="output directory")
    vlm.add_argument(
        "--text-tokens",
        type=_int_list,
        default=[0, 50],
        metavar="Q,...",
        help="text tokens per query Q for the cost 2 N (Q + V) (default 0,50: cached text, 50 uncached)",
    )
    vlm.add_argument(
        "--budgets",
        type=_float_list,
        default=None,
        metavar="FLOPS,...",
        help="inference budgets in FLOPs per query (default: 12 log-spaced over the sweep's own costs)",
    )
    vlm.add_argument(
        "--bootstrap", type=int, default=200, metavar="N", help="bootstrap resamples for the uncertainty (0: none)"
    )
    vlm.add_argument("--seed", type=int, default=0)
    vlm.set_defaults(_scaling_run=_run_vlm)

    enc = sub.add_parser(
        "encoder",
        help="fit held-out loss against encoder parameters and compute from a ladder of runs",
        description="Writes OUT/fit.json, OUT/scaling.png and OUT/report.md.",
    )
    enc.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="`aimv2 pretrain` run directories with a validation loss (data.val), or a directory "
        "holding them (e.g. runs/ladder/runs)",
    )
    enc.add_argument("--out", required=True, help="output directory")
    enc.add_argument(
        "--holdout",
        nargs="*",
        default=None,
        metavar="RUN_DIR",
        help="runs kept out of the fit and predicted by it (default: the run with the most compute)",
    )
    enc.add_argument(
        "--budgets",
        type=_float_list,
        default=None,
        metavar="FLOPS,...",
        help="pre-training compute budgets to predict the best encoder size for "
        "(default: 10x and 100x the ladder's largest)",
    )
    enc.set_defaults(_scaling_run=_run_encoder)


def run(args: argparse.Namespace) -> int:
    return args._scaling_run(args)


def _run_vlm(args: argparse.Namespace) -> int:
    from aimv2.scaling.vlm_budget import scale_vlm

    scale_vlm(
        args.results,
        args.out,
        text_tokens=args.text_tokens,
        budgets=args.budgets,
        bootstrap=args.bootstrap,
        seed=args.seed,
    )
    return 0


def _run_encoder(args: argparse.Namespace) -> int:
    from aimv2.scaling.encoder_budget import scale_encoder

    scale_encoder(args.runs, args.out, holdout=args.holdout, budgets=args.budgets)
    return 0
