"""`aimv2 export CHECKPOINT --format {aimv2,timm,hf} --out DIR`: an encoder for users without this package.

Any checkpoint `aimv2.load_encoder` reads can be exported (this project's .ckpt, a DeepSpeed ZeRO
or DCP (fsdp2) directory, an export, a timm or transformers directory, Apple's release). The output is a directory
that appears atomically; the command prints how to load it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "export a checkpoint's encoder for timm, transformers or this package (safetensors + config)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="a .ckpt, a ZeRO or DCP (fsdp2) checkpoint directory, an export, a "
        "timm/transformers directory or an Apple ml-aim state dict",
    )
    parser.add_argument(
        "--format",
        required=True,
        choices=("aimv2", "timm", "hf"),
        dest="fmt",
        help="aimv2: encoder(+decoder).safetensors + config.json; timm: timm's directory layout; "
        "hf: transformers Aimv2VisionModel directory",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (must not exist, see --overwrite)")
    parser.add_argument("--with-decoder", action="store_true", help="aimv2 format: also write the pre-training decoder")
    parser.add_argument(
        "--img-size",
        type=int,
        help="export at another resolution (a multiple of the patch size); "
        "the position embedding is resampled (a native-resolution "
        "encoder's sin-cos positions need none: only its nominal "
        "size changes)",
    )
    parser.add_argument(
        "--heads", type=int, help="attention heads, only for a bare state dict matching no size-table row"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


def usage_lines(fmt: str, out: Path) -> list[str]:
    """How to load the export, with the exact path (printed by the command, documented in docs/checkpoints.md)."""
    if fmt == "aimv2":
        return [f"from aimv2 import load_encoder; encoder, preprocessing = load_encoder({str(out)!r})"]
    if fmt == "hf":
        return [
            "from transformers import Aimv2VisionModel, AutoImageProcessor",
            f"model = Aimv2VisionModel.from_pretrained({str(out)!r})",
            f"processor = AutoImageProcessor.from_pretrained({str(out)!r})",
        ]
    cfg = json.loads((out / "config.json").read_text())
    args = ", ".join(f"{k}={v!r}" for k, v in cfg.get("model_args", {}).items())
    return [
        "import timm",
        f"model = timm.create_model('local-dir:{out}', pretrained=True)",
        "# or, by name:",
        f"model = timm.create_model({cfg['architecture']!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file={str(out / 'model.safetensors')!r}){', ' + args if args else ''})",
    ]


def run(args: argparse.Namespace) -> int:
    from aimv2.checkpoints.export import export_checkpoint

    loaded = export_checkpoint(
        args.checkpoint,
        args.out,
        args.fmt,
        img_size=args.img_size,
        with_decoder=args.with_decoder,
        overwrite=args.overwrite,
        heads=args.heads,
    )
    files = ", ".join(sorted(p.name for p in args.out.iterdir()))
    print(
        f"exported the {loaded.raw.format} checkpoint {loaded.raw.path} as {args.fmt} "
        f"({loaded.recipe.name}, {loaded.preprocessing.img_size} px) to {args.out}/: {files}"
    )
    print("load it with:")
    for line in usage_lines(args.fmt, args.out):
        print(f"  {line}")
    return 0
