"""Image files to visualize: paths or directories -> model-space tensors and their true captions.

Preprocessing is the released encoders' eval transform (resize the shorter side, center crop,
bicubic, CLIP mean/std), the same as the probe's. A caption is read from a sibling text file with
the image's stem (`cat.jpg` -> `cat.txt`), the convention of WebDataset and img2dataset.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from aimv2.data.samples import IMAGE_EXTS
from aimv2.data.transforms import eval_transform
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
