"""Image transforms: the pre-training recipe's (AIMv2 Table A1: RandomResizedCrop (bicubic),
horizontal flip, CLIP mean/std normalization, the statistics of the released encoders) and the
released encoders' eval transform (resize, center crop).

Images are decoded straight into uint8 tensors and cropped as tensors; the data workers stop at
uint8 (3, H, W); normalization to float happens on the training device (`normalize_images`, called
by the DataModule after the batch is transferred), as timm's fast collate + PrefetchLoader do:
workers skip two float passes over every image, and batches cross process boundaries and the
host-to-device copy at a quarter of the bytes.
"""

from __future__ import annotations

import torch
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as F


class RandomResizedCropFlip:
    """uint8 tensor (3, H, W) -> uint8 tensor (3, size, size): torchvision's RandomResizedCrop
    parameters and its v2 uint8 kernel (antialiased bicubic, within one level of 255 of PIL's
    bicubic at about a fifth of its time; tests/test_transforms.py), then a horizontal flip with
    probability `hflip`. Called directly rather than through v2.Compose, whose per-call dispatch cost
    a fifth of the crop itself (benchmarks/results/data_pipeline.md). Random draws come from torch's
    global generator, which the stream seeds per sample."""

    def __init__(self, size: int, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5):
        self.size, self.scale, self.ratio, self.hflip = size, list(scale), list(ratio), hflip

    def crop(self, image: torch.Tensor) -> torch.Tensor:
        top, left, height, width = RandomResizedCrop.get_params(image, self.scale, self.ratio)
        return F.resized_crop(image, top, left, height, width, [self.size, self.size],
                              interpolation=InterpolationMode.BICUBIC, antialias=True)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        out = self.crop(image)
        if self.hflip > 0 and torch.rand(1).item() < self.hflip:
            out = out.flip(-1)
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"hflip={self.hflip})")


def pretrain_transform(img_size: int, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5) -> RandomResizedCropFlip:
    """uint8 tensor (3, H, W) -> uint8 tensor (3, img_size, img_size)."""
    return RandomResizedCropFlip(img_size, scale, ratio, hflip)


def eval_transform(img_size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> T.Compose:
    """PIL image -> normalized float tensor: bicubic resize of the short side, center crop (the
    released encoders' preprocessing; used by the probe, the compressors and the visualizations)."""
    return T.Compose([T.Resize(img_size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(img_size),
                      T.ToTensor(), T.Normalize(mean, std)])


def normalize_images(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> CLIP-normalized floats, the same arithmetic as ToTensor + Normalize
    ((x / 255 - mean) / std); floating inputs are returned unchanged (already normalized)."""
    if images.is_floating_point():
        return images
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=dtype, device=images.device).view(1, 3, 1, 1)
    return images.to(dtype).div_(255).sub_(mean).div_(std)


def normalize_patch_pixels(patches: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 packed patches (..., p*p*3), pixels in (row, column, channel) order (aimv2.objective.patchify)
    -> CLIP-normalized floats, the arithmetic of `normalize_images`; floating inputs are returned unchanged."""
    if patches.is_floating_point():
        return patches
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=dtype, device=patches.device)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=dtype, device=patches.device)
    shape = patches.shape
    pixels = patches.to(dtype).view(*shape[:-1], -1, 3)  # (..., p*p, 3): the channel varies fastest
    return pixels.div_(255).sub_(mean).div_(std).view(shape)
