"""`aimv2 visualize CHECKPOINT --images PATH... [--out DIR] [--prefix-ratio R]`: what a checkpoint predicts.

For each image: the input, the prefix the encoder saw, the true next patches and the decoder's
predicted continuation (one PNG grid), and the caption the decoder generates greedily next to the
true one (read from a sibling `.txt`, e.g. `cat.jpg` -> `cat.txt`). Captions are decoded with the
tokenizer of the run (RUN/config.yaml beside the checkpoint's checkpoints/ directory). The work is
aimv2.viz.checkpoint's; this module is the command line.
"""

from __future__ import annotations

import argparse

HELP = "next-patch prediction grid and greedy captions of a pre-training checkpoint on chosen images"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="an `aimv2 pretrain` checkpoint, e.g. runs/demo/pretrain/checkpoints/last.ckpt "
        "(or a ZeRO directory, or an `aimv2 export --with-decoder` directory)",
    )
    parser.add_argument(
        "--images",
        nargs="+",
        required=True,
        metavar="PATH",
        help="image files or directories of images (captions from sibling .txt files, if any)",
    )
    parser.add_argument("--out", help="output directory (default: RUN/visualizations beside the checkpoint's run)")
    parser.add_argument(
        "--prefix-ratio",
        type=float,
        default=0.5,
        help="prefix length as a fraction of the patches, within (0, 1) (default 0.5)",
    )
    parser.add_argument("--max-caption-tokens", type=int, default=20, help="greedy caption length limit; 0: none")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")


def run(args: argparse.Namespace) -> int:
    from aimv2.viz.checkpoint import visualize_checkpoint

    done = visualize_checkpoint(
        args.checkpoint, args.images, args.out, args.prefix_ratio, args.max_caption_tokens, args.device
    )
    print(done["table"])
    step = f"step {done['step']}, " if done["step"] is not None else ""
    print(
        f"visualized {done['count']} image(s) with {args.checkpoint} ({step}prefix "
        f"{done['prefix']} patches, {done['img_size']} px)"
    )
    print(
        f"  grid      {done['grid']} ({done['size'][0]}x{done['size'][1]}: input | prefix | ground truth | prediction)"
    )
    print(f"  captions  {done['captions']}")
    return 0
