"""Turning one raw WebDataset sample (a dict of bytes) into an image and a caption.

Samples follow img2dataset's layout: `key.{jpg,jpeg,png,webp}` and a caption in `key.txt` or in the
`caption` field of `key.json`. Anything unusable raises `CorruptSample` with a reason; the stream
skips and counts it.
"""

from __future__ import annotations

import io
import json

import torch
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as decode_image_bytes
from torchvision.transforms.functional import pil_to_tensor

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class CorruptSample(Exception):
    """A sample that cannot be used (undecodable image, missing or empty caption)."""


def image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        data = sample.get(ext)
        if data is not None:
            return data
    raise CorruptSample(f"no image ({'/'.join(IMAGE_EXTS)}) in sample {sample.get('__key__')!r}")


def image_header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from an encoded image's header, without decoding its pixels."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception as err:  # noqa: BLE001 - any header error means an unusable image
        raise CorruptSample(f"unreadable image header ({type(err).__name__})") from None


def decode_image(sample: dict) -> Image.Image:
    data = image_bytes(sample)
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")  # forces a full decode: truncated files fail here, not later
    except Exception as err:
        raise CorruptSample(f"undecodable image in sample {sample.get('__key__')!r}: {err}") from None


def decode_image_tensor(sample: dict) -> torch.Tensor:
    """uint8 (3, H, W) RGB, decoded by torchvision (libjpeg-turbo, as PIL: the same pixels) straight
    into a tensor, so the tensor transforms that follow skip PIL's much slower resampling
    (benchmarks/results/data_pipeline.md). Formats torchvision cannot read go through PIL."""
    data = image_bytes(sample)
    try:
        return decode_image_bytes(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return pil_to_tensor(decode_image(sample))  # raises CorruptSample when PIL cannot read it either


def decode_caption(sample: dict) -> str:
    caption = None
    try:
        if sample.get("txt") is not None:
            caption = sample["txt"].decode("utf-8")
        elif sample.get("json") is not None:
            caption = json.loads(sample["json"]).get("caption")
    except (UnicodeDecodeError, ValueError, AttributeError) as err:
        raise CorruptSample(f"unreadable caption in sample {sample.get('__key__')!r}: {err}") from None
    if not isinstance(caption, str) or not caption.strip():
        raise CorruptSample(f"missing or empty caption in sample {sample.get('__key__')!r}")
    return caption.strip()
