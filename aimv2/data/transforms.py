"""Image transforms of the pre-training recipe (AIMv2 Table A1): RandomResizedCrop (bicubic),
horizontal flip, CLIP mean/std normalization (the statistics of the released encoders)."""

from __future__ import annotations

from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torchvision import transforms as T


def pretrain_transform(img_size: int, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5) -> T.Compose:
    steps = [T.RandomResizedCrop(img_size, scale=tuple(scale), ratio=tuple(ratio),
                                 interpolation=T.InterpolationMode.BICUBIC)]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    steps += [T.ToTensor(), T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    return T.Compose(steps)
