"""What a pre-training checkpoint predicts on chosen image files (`aimv2 visualize`, the demo).

Image files to visualize: paths or directories -> model-space tensors and their true captions.

Preprocessing is the released encoders' eval transform (resize the shorter side, center crop,
bicubic, CLIP mean/std), the same as the probe's. A caption is read from a sibling text file with
the image's stem (`cat.jpg` -> `cat.txt`), the convention of WebDataset and img2dataset.

What a pre-training checkpoint predicts on chosen images (`aimv2 visualize`, the demo): the frame
the training callback draws (aimv2.viz.frame), from a checkpoint read by aimv2.checkpoints.

Captions are decoded with the tokenizer of the run the checkpoint belongs to (RUN/config.yaml, found
through aimv2.engine.run_dir); a checkpoint outside a run directory gets the default CLIP tokenizer,
with a note.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image

from aimv2.data.samples import IMAGE_EXTS, eval_transform
from aimv2.engine.run_dir import RunDir
from aimv2.errors import UserError


def image_files(paths: list[str], key: str = "--images") -> list[Path]:
    """Files as given, and the image files of directories (sorted); a UserError names a missing path."""
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
            if not found:
                raise UserError(f"{key}: no {'/'.join(IMAGE_EXTS)} images in directory {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{key}: image not found: {path}")
    return files


def load_images(paths: list[str], img_size: int, key: str = "--images") -> tuple[torch.Tensor, list[str | None]]:
    """(images (B, 3, S, S) in model space, captions from sibling .txt files or None)."""
    transform = eval_transform(img_size)
    images, captions = [], []
    for path in image_files(paths, key):
        try:
            with Image.open(path) as img:
                images.append(transform(img.convert("RGB")))
        except Exception as err:  # noqa: BLE001 - any decoder failure: say which file
            raise UserError(f"{key}: cannot read image {path} ({type(err).__name__}: {err})") from None
        text = path.with_suffix(".txt")
        captions.append(" ".join(text.read_text(encoding="utf-8").split()) if text.is_file() else None)
    return torch.stack(images), captions


def run_tokenizer(run: RunDir | None):
    """The tokenizer the run trained with, from RUN/config.yaml; the default one (with a note) when unknown."""
    from omegaconf import OmegaConf

    from aimv2.config import TokenizerConfig
    from aimv2.data.tokenizer import build_tokenizer

    if run is None or not run.config.is_file():
        where = f"no {run.config}" if run is not None else "the checkpoint is not in a run's checkpoints/ directory"
        print(f"visualize: {where}: assuming the default CLIP tokenizer for captions", file=sys.stderr)
        return build_tokenizer(TokenizerConfig())
    section = OmegaConf.to_container(OmegaConf.load(run.config)).get("data", {}).get("tokenizer", {})
    return build_tokenizer(TokenizerConfig(**section))


def visualize_checkpoint(
    checkpoint: str | Path,
    images: list[str],
    out: str | Path | None = None,
    prefix_ratio: float = 0.5,
    max_caption_tokens: int = 20,
    device: str = "auto",
) -> dict:
    """Write the grid PNG and the captions Markdown of `checkpoint` on `images` (default output:
    RUN/visualizations of the checkpoint's run); returns what was written."""
    import torch

    from aimv2.checkpoints.loading import load_pretrained
    from aimv2.fileio import atomic_write
    from aimv2.viz.frame import make_frame
    from aimv2.viz.prediction_grid import save_png

    if not 0 < prefix_ratio < 1:
        raise UserError(f"--prefix-ratio must be within (0, 1), got {prefix_ratio}")
    checkpoint = Path(checkpoint)
    image_files(images)  # a missing image is reported before the model is loaded
    pretrained = load_pretrained(checkpoint)
    model, step = pretrained.model, pretrained.step
    run = RunDir.of_checkpoint(checkpoint.resolve())
    pixels, captions = load_images(images, model.img_size)
    tokenizer = run_tokenizer(run) if max_caption_tokens > 0 else None
    if tokenizer is not None and tokenizer.vocab_size != model.decoder.text_head.out_features:
        where = run.config if run is not None else "the default CLIP tokenizer"
        raise UserError(
            f"{where}: its tokenizer has {tokenizer.vocab_size} tokens but the "
            f"checkpoint's text head {model.decoder.text_head.out_features}"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    frame = make_frame(
        model.to(torch.device(device)),
        pixels,
        prefix_ratio,
        tokenizer=tokenizer,
        true_captions=captions,
        max_caption_tokens=max_caption_tokens,
    )
    out = Path(out) if out else (run or RunDir(checkpoint.parent)).visualizations
    grid = save_png(frame.image, out / f"visualize_{checkpoint.stem}.png")
    notes = out / f"visualize_{checkpoint.stem}.md"
    table = frame.captions_markdown()
    at = f" (step {step})" if step is not None else ""
    atomic_write(notes, f"# {checkpoint}{at}\n\n![predictions]({grid.name})\n\n{table}\n")
    return {
        "grid": grid,
        "captions": notes,
        "table": table,
        "step": step,
        "count": len(captions),
        "prefix": f"{frame.prefix_lengths[0]}/{frame.num_patches}",
        "img_size": model.img_size,
        "size": frame.image.size,
    }
