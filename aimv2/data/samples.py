"""One raw sample into tensors: decoding its image and caption, the crop/flip/normalization transforms
(train and eval), and the per-sample processor and collator of image-caption batches.

Turning one raw WebDataset sample (a dict of bytes) into an image and a caption.

Samples follow img2dataset's layout: `key.{jpg,jpeg,png,webp}` and a caption in `key.txt` or in the
`caption` field of `key.json`. Anything unusable raises `CorruptSample` with a reason; the stream
skips and counts it.

Image transforms: the pre-training recipe's (AIMv2 Table A1: RandomResizedCrop (bicubic),
horizontal flip, CLIP mean/std normalization, the statistics of the released encoders) and the
released encoders' eval transform (resize, center crop).

Images are decoded straight into uint8 tensors and cropped as tensors; the data workers stop at
uint8 (3, H, W); normalization to float happens on the training device (`normalize_images`, called
by the DataModule after the batch is transferred), as timm's fast collate + PrefetchLoader do:
workers skip two float passes over every image, and batches cross process boundaries and the
host-to-device copy at a quarter of the bytes.

Image-caption samples into training batches: the per-sample processor the stream's workers run
(decode, transform, caption) and the collator that tokenizes and stacks. Shared by pre-training and
compressor alignment.
"""

from __future__ import annotations

import io
import json

import torch
from PIL import Image
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torchvision import transforms as T
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as decode_image_bytes
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.functional import pil_to_tensor
from torchvision.transforms.v2 import functional as F

from aimv2.data.tokenizer import CaptionTokenizer

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
        return F.resized_crop(
            image,
            top,
            left,
            height,
            width,
            [self.size, self.size],
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        out = self.crop(image)
        if self.hflip > 0 and torch.rand(1).item() < self.hflip:
            out = out.flip(-1)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip})"


def pretrain_transform(
    img_size: int, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5
) -> RandomResizedCropFlip:
    """uint8 tensor (3, H, W) -> uint8 tensor (3, img_size, img_size)."""
    return RandomResizedCropFlip(img_size, scale, ratio, hflip)


def eval_transform(img_size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> T.Compose:
    """PIL image -> normalized float tensor: bicubic resize of the short side, center crop (the
    released encoders' preprocessing; used by the probe, the compressors and the visualizations)."""
    return T.Compose(
        [
            T.Resize(img_size, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


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


class ImageCaptionProcessor:
    """One raw sample -> (image tensor (3, H, W), caption); raises CorruptSample when unusable.
    `decode` gives what `transform` takes: a PIL image (default) or a uint8 tensor."""

    def __init__(self, transform, decode=decode_image):
        self.transform, self.decode = transform, decode

    def __call__(self, sample: dict) -> tuple[torch.Tensor, str]:
        caption = decode_caption(sample)
        return self.transform(self.decode(sample)), caption


class ImageCaptionCollator:
    def __init__(self, tokenizer: CaptionTokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[tuple[torch.Tensor, str]]) -> dict:
        """An empty list (an evaluation batch of corrupt samples only) gives empty tensors."""
        tokens, mask = self.tokenizer([caption for _, caption in items])
        if not items:
            return {
                "image": torch.empty(0),
                "tokens": tokens,
                "token_mask": mask,
                "token_index": torch.empty(0, dtype=torch.long),
            }
        # Flat positions of the real tokens, found here on the host: packing the logits on the device
        # by the boolean mask would stall the step on a device-to-host sync.
        return {
            "image": torch.stack([image for image, _ in items]),
            "tokens": tokens,
            "token_mask": mask,
            "token_index": mask.flatten().nonzero().squeeze(1),
        }
