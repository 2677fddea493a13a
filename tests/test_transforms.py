"""The pre-training transform stops at uint8; normalization on the device gives exactly what
ToTensor + Normalize gave in the workers."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torchvision import transforms as T
from torchvision.transforms.functional import pil_to_tensor

from aimv2.data.samples import CorruptSample, decode_image, decode_image_tensor, normalize_images, pretrain_transform


def photo(seed: int = 0) -> Image.Image:
    """Smooth shapes plus noise, like a photo (pure noise would exaggerate resampling differences)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)).resize((200, 150), Image.BICUBIC)
    return Image.fromarray((np.asarray(coarse) + rng.normal(0, 8, (150, 200, 3))).clip(0, 255).astype(np.uint8))


def test_pretrain_transform_gives_uint8_crops():
    out = pretrain_transform(28)(pil_to_tensor(photo()))
    assert out.dtype == torch.uint8 and out.shape == (3, 28, 28)


def test_tensor_crop_matches_pil_bicubic_within_one_level():
    img = photo(1)
    torch.manual_seed(3)
    ours = pretrain_transform(56, hflip=0)(pil_to_tensor(img))
    torch.manual_seed(3)  # the same crop box drawn
    reference = pil_to_tensor(T.RandomResizedCrop(56, scale=(0.4, 1.0), interpolation=T.InterpolationMode.BICUBIC)(img))
    diff = (ours.int() - reference.int()).abs()
    assert diff.max().item() <= 1 and diff.float().mean().item() < 0.25  # rounding: 14% of values differ by 1


def test_tensor_decode_gives_pils_pixels_and_rejects_truncated_files():
    buf = io.BytesIO()
    photo(2).save(buf, "JPEG", quality=90)
    sample = {"__key__": "k", "jpg": buf.getvalue()}
    assert torch.equal(decode_image_tensor(sample), pil_to_tensor(decode_image(sample)))
    with pytest.raises(CorruptSample, match="undecodable image in sample 'k'"):
        decode_image_tensor({"__key__": "k", "jpg": buf.getvalue()[:500]})
    png = io.BytesIO()
    photo(3).convert("L").save(png, "PNG")  # grey PNG -> three equal channels
    grey = decode_image_tensor({"__key__": "g", "png": png.getvalue()})
    assert grey.shape == (3, 150, 200) and torch.equal(grey[0], grey[2])


def test_normalize_on_device_equals_totensor_normalize_bitwise():
    pixels = np.random.default_rng(1).integers(0, 256, (2, 28, 28, 3), dtype=np.uint8)
    reference = torch.stack(
        [T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)(T.ToTensor()(Image.fromarray(p))) for p in pixels]
    )
    ours = normalize_images(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous())
    assert ours.dtype == torch.float32 and torch.equal(ours, reference)
    # A white pixel's red channel by hand: (1 - 0.48145466) / 0.26862954 = 1.9303361
    white = normalize_images(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8))
    assert abs(white[0, 0, 0, 0].item() - 1.9303361) < 1e-6
    assert normalize_images(reference) is reference  # floats are taken as already normalized
