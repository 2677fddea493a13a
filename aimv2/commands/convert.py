"""`aimv2 convert DIR OUT.ckpt`: one checkpoint file from a sharded checkpoint directory.

A torch.distributed.checkpoint directory (the fsdp2 strategy's `step=N.ckpt/`, or any DCP checkpoint in
Lightning's layout) becomes the single Lightning file that `aimv2 pretrain` writes under ddp: the full
model state dict, Lightning's metadata (hyper-parameters, global step, loops) and, unless
`--no-optimizer`, the optimizer states re-keyed the way a plain torch optimizer stores them. It runs
on the CPU in one process (no process group, any number of ranks wrote it), and the file appears
atomically. `load_encoder`, `aimv2 probe --checkpoint` and `aimv2 export` also read the directory
itself; convert it to hand one file on, or to continue the run under another strategy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "convert a sharded (DCP / fsdp2) checkpoint directory to one checkpoint file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a DCP checkpoint directory, e.g. RUN/checkpoints/last.ckpt/ "
                                                      "written by --strategy fsdp2")
    parser.add_argument("out", type=Path, help="the single-file checkpoint to write (must not exist, see --overwrite)")
    parser.add_argument("--no-optimizer", action="store_true", help="leave the optimizer states out (weights and "
                                                                    "metadata only: a smaller file)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT file")


def run(args: argparse.Namespace) -> int:
    from aimv2.checkpoints.dcp import convert_dcp_to_file, is_dcp_checkpoint
    from aimv2.errors import UserError

    if not args.checkpoint.exists():
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    if not is_dcp_checkpoint(args.checkpoint):
        raise UserError(f"{args.checkpoint}: not a DCP checkpoint directory (no .metadata, no .distcp shards); "
                        "single files and exports need no conversion, ZeRO directories convert through `aimv2 export`")
    written = convert_dcp_to_file(args.checkpoint, args.out, optimizer=not args.no_optimizer, overwrite=args.overwrite)
    tensors = len(written["state_dict"])
    optim = f", {len(written.get('optimizer_states', []))} optimizer state(s)" if "optimizer_states" in written else ""
    step = f" at step {written['global_step']}" if "global_step" in written else ""
    print(f"converted the DCP checkpoint {args.checkpoint}{step} to {args.out} ({tensors} tensors{optim})")
    print(f"load it with: from aimv2 import load_encoder; encoder, preprocessing = load_encoder({str(args.out)!r})")
    return 0
