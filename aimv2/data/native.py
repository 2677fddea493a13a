"""Native resolution, data side: each image's patch grid under a patch budget, its size read without
decoding, and first-fit-decreasing packing of images into rows and batches under a token budget.

Grid: an image keeps its aspect ratio and, when its own size gives between `min_patches` and
`max_patches` patches, its size (to the patch); a larger one is scaled down to at most `max_patches`,
a smaller one up to at least `min_patches` (NaFlex, SigLIP 2; AIMv2's native encoder serves 112 to
4096 patches).

Size without decoding: img2dataset writes `width` and `height` into each sample's json (so does this
project's shard writer); otherwise PIL reads them from the image header (no pixel decode).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from aimv2.data.samples import CorruptSample, decode_caption, image_bytes, image_header_size
from aimv2.models.native import pack_layout, pack_patches
from aimv2.objective import patchify


def native_grid(width: int, height: int, patch: int, min_patches: int, max_patches: int) -> tuple[int, int]:
    """(rows, columns) of patches for a width x height image (module docstring)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} is not positive")
    if not 2 <= min_patches <= max_patches:
        raise ValueError(f"need 2 <= min_patches <= max_patches, got {min_patches}, {max_patches}")
    ideal_h, ideal_w = height / patch, width / patch
    area = min(max(ideal_h * ideal_w, min_patches), max_patches)
    scale = math.sqrt(area / (ideal_h * ideal_w))
    gh, gw = max(1, math.floor(ideal_h * scale + 1e-9)), max(1, math.floor(ideal_w * scale + 1e-9))
    while gh * gw > max_patches:  # an extreme aspect ratio floored to 1 on one side
        if gh >= gw:
            gh -= 1
        else:
            gw -= 1
    while gh * gw < min_patches:  # flooring lost patches: grow the side furthest below its ideal
        taller, wider = (gh + 1) * gw <= max_patches, gh * (gw + 1) <= max_patches
        if taller and (not wider or gh / (ideal_h * scale) <= gw / (ideal_w * scale)):
            gh += 1
        elif wider:
            gw += 1
        else:
            break
    return gh, gw


def image_size(sample: dict) -> tuple[int, int]:
    """(width, height) of a raw webdataset sample without decoding its pixels."""
    meta = sample.get("json")
    if meta is not None:
        try:
            info = json.loads(meta) if isinstance(meta, (bytes, str)) else meta
            width, height = int(info["width"]), int(info["height"])
            if width > 0 and height > 0:
                return width, height
        except (ValueError, KeyError, TypeError):
            pass  # no usable size in the json: read the header
    try:
        return image_header_size(image_bytes(sample))  # CorruptSample when there is none, or no header
    except CorruptSample as err:
        raise CorruptSample(f"sample {sample.get('__key__')!r}: {err}") from None


def place_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """First-fit decreasing: indices of `lengths` in rows of at most `row_tokens`, longest first."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        if lengths[i] > row_tokens:
            raise ValueError(f"an image of {lengths[i]} patches does not fit a row of {row_tokens} tokens")
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_tokens - lengths[i])
    return rows


def pack_batches(lengths: Sequence[int], row_tokens: int, rows_per_batch: int | None) -> list[list[list[int]]]:
    """`place_rows`, then rows grouped into batches of `rows_per_batch` (the last may hold fewer),
    fullest rows first so that any short batch is the emptiest; None: one batch of all the rows."""
    rows = place_rows(lengths, row_tokens)
    if rows_per_batch is None:
        return [rows] if rows else []
    rows.sort(key=lambda row: -sum(lengths[i] for i in row))
    return [rows[k : k + rows_per_batch] for k in range(0, len(rows), rows_per_batch)]


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[Sequence[int]]], row_tokens: int) -> float:
    """Share of encoder tokens that are padding over `batches` of rows of `row_tokens`."""
    total = sum(len(batch) for batch in batches) * row_tokens
    return 1.0 - sum(lengths) / total if total else 0.0


@dataclass(frozen=True)
class NativePlan:
    """What the packer decided for one sample before decoding it: the image size it measured (height,
    width), the crop box in it (top, left, height, width) and the patch grid (rows, columns) that
    crop is resized to."""

    size: tuple[int, int]
    box: tuple[int, int, int, int]
    grid: tuple[int, int]


@dataclass(frozen=True)
class Packing:
    """How a native-resolution stream batches (data.native; see NativeDataConfig), and the random
    resized crop it applies (data.crop_scale, data.crop_ratio: scale and aspect augmentation, as the
    fixed-size recipe's RandomResizedCrop, but the crop keeps its own aspect ratio and size)."""

    patch: int
    min_patches: int
    max_patches: int
    row_tokens: int
    rows: int | None  # None: every row a window needs, in one batch (epoch mode; aimv2.data.stream)
    window: int
    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (1.0, 1.0)

    def plan(self, sample: dict) -> NativePlan:
        """The crop (drawn from torch's global generator, which the stream seeds per sample) and the
        grid of a raw sample, from its size read without decoding."""
        width, height = image_size(sample)
        if tuple(self.crop_scale) == (1.0, 1.0):
            box = (0, 0, height, width)
        else:  # torchvision's parameters; it reads only the shape of this zero-byte stand-in
            shape_only = torch.empty((), dtype=torch.uint8).expand(1, height, width)
            box = tuple(RandomResizedCrop.get_params(shape_only, list(self.crop_scale), list(self.crop_ratio)))
        grid = native_grid(box[3], box[2], self.patch, self.min_patches, self.max_patches)
        return NativePlan((height, width), box, grid)


class NativeResizeFlip:
    """uint8 (3, H, W) -> uint8 (3, gh * p, gw * p): the planned crop resized to the planned grid
    (antialiased bicubic, torchvision's uint8 kernel as RandomResizedCropFlip), then a horizontal flip
    with probability `hflip` (torch's global generator, seeded per sample by the stream)."""

    def __init__(self, patch: int, hflip: float = 0.5):
        self.patch, self.hflip = patch, hflip

    def __call__(self, image: torch.Tensor, plan: NativePlan) -> torch.Tensor:
        top, left, height, width = plan.box
        actual = tuple(image.shape[-2:])
        if actual != plan.size:  # a json size that is not the stored image's: the same crop, proportionally
            sy, sx = actual[0] / plan.size[0], actual[1] / plan.size[1]
            top, left = int(top * sy), int(left * sx)
            height, width = max(1, round(height * sy)), max(1, round(width * sx))
        size = [plan.grid[0] * self.patch, plan.grid[1] * self.patch]
        out = F.resized_crop(
            image, top, left, height, width, size, interpolation=InterpolationMode.BICUBIC, antialias=True
        )
        if self.hflip > 0 and torch.rand(1).item() < self.hflip:
            out = out.flip(-1)
        return out


class NativeImageCaptionProcessor:
    """One raw sample and its plan -> (uint8 image (3, gh*p, gw*p), caption); CorruptSample when unusable."""

    def __init__(self, transform: NativeResizeFlip, decode):
        self.transform, self.decode = transform, decode

    def __call__(self, sample: dict, plan: NativePlan) -> tuple[torch.Tensor, str]:
        caption = decode_caption(sample)
        return self.transform(self.decode(sample), plan), caption


class PackedCollator:
    """Images of any grid with their captions, placed in rows -> one packed batch: uint8 patches
    (R, T, p*p*3) in patchify's order, the tokens (n, L), and the layout of aimv2.models.native."""

    def __init__(self, tokenizer, patch: int, row_tokens: int):
        self.tokenizer, self.patch, self.row_tokens = tokenizer, patch, row_tokens

    def __call__(self, items: list[tuple[torch.Tensor, str]], rows: list[list[int]]) -> dict:
        tokens, mask = self.tokenizer([caption for _, caption in items])
        grids = [(image.shape[-2] // self.patch, image.shape[-1] // self.patch) for image, _ in items]
        layout = pack_layout(grids, mask.sum(1).tolist(), rows, self.row_tokens, tokens.shape[1])
        patches = pack_patches([patchify(image[None], self.patch)[0] for image, _ in items], layout)
        # grids: a list, so it stays on the host (the prefix lengths are drawn from it without a sync)
        return {"patches": patches, "tokens": tokens, "token_mask": mask, "layout": layout, "grids": grids}
