"""One module per `aimv2` verb (aimv2.cli dispatches by name); options two verbs share are here."""

from __future__ import annotations

import argparse


def add_rehearse_arguments(parser: argparse.ArgumentParser, help: str) -> None:
    """`--rehearse` and its two settings, for the verbs that train (pretrain, compress train)."""
    parser.add_argument("--rehearse", action="store_true", help=help)
    parser.add_argument(
        "--rehearse-devices",
        type=int,
        default=None,
        metavar="N",
        help="DDP processes of the rehearsal (default: the config's, at most 2)",
    )
    parser.add_argument(
        "--rehearse-dir",
        default="runs/rehearse",
        metavar="DIR",
        help="where the rehearsal runs (default runs/rehearse; its demo shards are reused)",
    )
