"""`aimv2 visualize CHECKPOINT --images PATH... [--out DIR] [--prefix-ratio R]`: what a checkpoint predicts.

For each image: the input, the prefix the encoder saw, the true next patches and the decoder's
predicted continuation (one PNG grid), and the caption the decoder generates greedily next to the
true one (read from a sibling `.txt`, e.g. `cat.jpg` -> `cat.txt`). Captions are decoded with the
tokenizer of the run (RUN/config.yaml beside the checkpoint's checkpoints/ directory).
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "next-patch prediction grid and greedy captions of a pre-training checkpoint on chosen images"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="an `aimv2 pretrain` checkpoint, e.g. runs/demo/pretrain/checkpoints/last.ckpt")
    parser.add_argument("--images", nargs="+", required=True, metavar="PATH",
                        help="image files or directories of images (captions from sibling .txt files, if any)")
    parser.add_argument("--out", help="output directory (default: RUN/visualizations beside the checkpoint's run)")
    parser.add_argument("--prefix-ratio", type=float, default=0.5,
                        help="prefix length as a fraction of the patches, within (0, 1) (default 0.5)")
    parser.add_argument("--max-caption-tokens", type=int, default=20, help="greedy caption length limit; 0: none")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")


def load_run_tokenizer(run_dir: Path):
    """The tokenizer the run trained with, from RUN/config.yaml; None (with a note) when unknown."""
    import sys

    from omegaconf import OmegaConf

    from aimv2.config import TokenizerConfig
    from aimv2.data.tokenizer import build_tokenizer

    config = run_dir / "config.yaml"
    if not config.is_file():
        print(f"visualize: no {config}: assuming the default CLIP tokenizer for captions", file=sys.stderr)
        return build_tokenizer(TokenizerConfig())
    section = OmegaConf.to_container(OmegaConf.load(config)).get("data", {}).get("tokenizer", {})
    return build_tokenizer(TokenizerConfig(**section))


def load_model(checkpoint: Path):
    """(AIMv2 model in eval mode, training step) from an `aimv2 pretrain` checkpoint."""
    import torch

    from aimv2.errors import UserError
    from aimv2.pretraining.module import AIMv2PretrainModule

    if not checkpoint.is_file():
        raise UserError(f"checkpoint not found: {checkpoint}")
    try:
        raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure: not a checkpoint we can read
        raise UserError(f"{checkpoint}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(raw, dict) or "model" not in (raw.get("hyper_parameters") or {}) or "state_dict" not in raw:
        raise UserError(f"{checkpoint}: not an `aimv2 pretrain` checkpoint (no model hyper-parameters / state_dict)")
    module = AIMv2PretrainModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    return module.model.eval(), int(raw.get("global_step", 0))


def visualize_checkpoint(checkpoint: str | Path, images: list[str], out: str | Path | None = None,
                         prefix_ratio: float = 0.5, max_caption_tokens: int = 20, device: str = "auto") -> dict:
    """Write the grid PNG and the captions Markdown of `checkpoint` on `images`; returns what was written."""
    import torch

    from aimv2.errors import UserError
    from aimv2.fileio import atomic_write
    from aimv2.viz.frame import make_frame
    from aimv2.viz.grid import save_png
    from aimv2.viz.images import image_files, load_images

    if not 0 < prefix_ratio < 1:
        raise UserError(f"--prefix-ratio must be within (0, 1), got {prefix_ratio}")
    checkpoint = Path(checkpoint)
    image_files(images)  # a missing image is reported before the model is loaded
    model, step = load_model(checkpoint)
    run_dir = checkpoint.resolve().parent.parent
    pixels, captions = load_images(images, model.img_size)
    tokenizer = load_run_tokenizer(run_dir) if max_caption_tokens > 0 else None
    if tokenizer is not None and tokenizer.vocab_size != model.decoder.text_head.out_features:
        raise UserError(f"{run_dir / 'config.yaml'}: its tokenizer has {tokenizer.vocab_size} tokens but the "
                        f"checkpoint's text head {model.decoder.text_head.out_features}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    frame = make_frame(model.to(torch.device(device)), pixels, prefix_ratio, tokenizer=tokenizer,
                       true_captions=captions, max_caption_tokens=max_caption_tokens)
    out = Path(out) if out else run_dir / "visualizations"
    grid = save_png(frame.image, out / f"visualize_{checkpoint.stem}.png")
    notes = out / f"visualize_{checkpoint.stem}.md"
    table = frame.captions_markdown()
    atomic_write(notes, f"# {checkpoint} (step {step})\n\n![predictions]({grid.name})\n\n{table}\n")
    return {"grid": grid, "captions": notes, "table": table, "step": step, "count": len(captions),
            "prefix": f"{frame.prefix_lengths[0]}/{frame.num_patches}", "img_size": model.img_size,
            "size": frame.image.size}


def run(args: argparse.Namespace) -> int:
    done = visualize_checkpoint(args.checkpoint, args.images, args.out, args.prefix_ratio, args.max_caption_tokens,
                                args.device)
    print(done["table"])
    print(f"visualized {done['count']} image(s) with {args.checkpoint} (step {done['step']}, prefix "
          f"{done['prefix']} patches, {done['img_size']} px)")
    print(f"  grid      {done['grid']} ({done['size'][0]}x{done['size'][1]}: input | prefix | ground truth | prediction)")
    print(f"  captions  {done['captions']}")
    return 0
