"""`aimv2 checkpoint {schema,inspect,convert}`: what a checkpoint holds, and one file from a sharded one.

- `schema`: the checkpoint schema's version and keys (aimv2.checkpoints.schema), as this code writes them.
- `inspect PATH`: one checkpoint's format, schema version, job, step and toolkit fields, read without
  building a model (a file, a ZeRO or DCP directory, or an export).
- `convert DIR OUT.ckpt`: a torch.distributed.checkpoint directory (the fsdp2 strategy's `step=N.ckpt/`,
  or any DCP checkpoint in Lightning's layout) becomes the single Lightning file that `aimv2 pretrain`
  writes under ddp: the full model state dict, Lightning's metadata (hyper-parameters, global step,
  loops) and, unless `--no-optimizer`, the optimizer states re-keyed the way a plain torch optimizer
  stores them. It runs on the CPU in one process (no process group, any number of ranks wrote it), and
  the file appears atomically. `load_encoder`, `aimv2 probe --checkpoint` and `aimv2 export` also read
  the directory itself; convert it to hand one file on, or to continue the run under another strategy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "a checkpoint's schema and contents; a sharded (DCP / fsdp2) checkpoint directory as one file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("schema", help="print the checkpoint schema's version and keys")
    inspect = sub.add_parser("inspect", help="print one checkpoint's format, schema version, job, step and fields")
    inspect.add_argument("checkpoint", type=Path, help="a checkpoint file or directory")
    convert = sub.add_parser("convert", help="convert a DCP checkpoint directory to one checkpoint file")
    convert.add_argument(
        "checkpoint",
        type=Path,
        help="a DCP checkpoint directory, e.g. RUN/checkpoints/last.ckpt/ written by --strategy fsdp2",
    )
    convert.add_argument("out", type=Path, help="the single-file checkpoint to write (must not exist, see --overwrite)")
    convert.add_argument(
        "--no-optimizer",
        action="store_true",
        help="leave the optimizer states out (weights and metadata only: a smaller file)",
    )
    convert.add_argument("--overwrite", action="store_true", help="replace an existing OUT file")


def run(args: argparse.Namespace) -> int:
    from aimv2.checkpoints import schema

    if args.action == "schema":
        print(schema.describe())
        return 0
    if args.action == "inspect":
        return _inspect(args.checkpoint)
    return _convert(args)


def _inspect(path: Path) -> int:
    from aimv2.checkpoints import schema
    from aimv2.checkpoints.formats import client_state, detect_format
    from aimv2.errors import UserError

    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    fmt = detect_format(path)
    state = client_state(path, fmt)
    print(f"{path}: format {fmt}")
    if state is None:
        print("  no training state (an export or a foreign checkpoint): nothing of the schema to show")
        return 0
    version = schema.check_version(state, path)
    part = schema.read(state, path)
    print(f"  schema version {version}" + (" (written before versions; read as version 2)" if version == 1 else ""))
    print(f"  job {part.get('job', 'unknown')}, step {schema.global_step(state)}")
    print(
        f"  weights: {len(schema.model_state(state))} tensors"
        if schema.model_state(state)
        else "  weights: in the directory's shards"
    )
    for key in sorted(k for k in part if k not in ("version", "job")):
        print(f"  {key}: {part[key]}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from aimv2.checkpoints.dcp import convert_dcp_to_file, is_dcp_checkpoint
    from aimv2.errors import UserError

    if not args.checkpoint.exists():
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    if not is_dcp_checkpoint(args.checkpoint):
        raise UserError(
            f"{args.checkpoint}: not a DCP checkpoint directory (no .metadata, no .distcp shards); "
            "single files and exports need no conversion, ZeRO directories convert through `aimv2 export`"
        )
    written = convert_dcp_to_file(args.checkpoint, args.out, optimizer=not args.no_optimizer, overwrite=args.overwrite)
    tensors = len(written["state_dict"])
    optim = f", {len(written.get('optimizer_states', []))} optimizer state(s)" if "optimizer_states" in written else ""
    step = f" at step {written['global_step']}" if "global_step" in written else ""
    print(f"converted the DCP checkpoint {args.checkpoint}{step} to {args.out} ({tensors} tensors{optim})")
    print(f"load it with: from aimv2 import load_encoder; encoder, preprocessing = load_encoder({str(args.out)!r})")
    return 0
