"""The frozen encoder of a probe, from a checkpoint, with the preprocessing it expects.

Today: `aimv2 pretrain` checkpoints (Lightning .ckpt whose hyper-parameters are plain dicts).
Other formats (timm / transformers exports, Apple's release) will be added here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models.vision_transformer import VisionTransformer

from aimv2.errors import UserError


@dataclass(frozen=True)
class Preprocessing:
    """Eval preprocessing: resize (shorter side) + center crop to img_size, bicubic, CLIP mean/std."""

    img_size: int
    mean: tuple[float, float, float] = tuple(OPENAI_CLIP_MEAN)
    std: tuple[float, float, float] = tuple(OPENAI_CLIP_STD)
    interpolation: str = "bicubic"


def load_encoder_from_pretrain_checkpoint(path: str | Path) -> tuple[VisionTransformer, int, Preprocessing]:
    """(encoder in eval mode, its training resolution, its preprocessing) from an `aimv2 pretrain` checkpoint."""
    from aimv2.training.module import AIMv2PretrainModule

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means not a checkpoint we can read
        raise UserError(f"{path}: not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    hparams = raw.get("hyper_parameters") if isinstance(raw, dict) else None
    if not isinstance(hparams, dict) or "model" not in hparams or "state_dict" not in raw:
        raise UserError(f"{path}: not an `aimv2 pretrain` checkpoint (no model hyper-parameters / state_dict)")
    module = AIMv2PretrainModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    encoder = module.model.encoder.eval()
    img_size = int(module.model.img_size)
    return encoder, img_size, Preprocessing(img_size)


def fit_resolution(encoder: VisionTransformer, trained_size: int, wanted: int) -> int:
    """The resolution to feed: the encoder's own (wanted=0), or `wanted` when the encoder can take it
    (a multiple of its patch size; position embeddings are resampled). Else a UserError naming it."""
    if wanted in (0, trained_size):
        return trained_size
    patch = encoder.patch_embed.patch_size[0]
    if wanted % patch:
        raise UserError(f"img_size={wanted} does not fit the encoder: not a multiple of its patch size {patch} "
                        f"(it was trained at {trained_size}; img_size=0 uses that)")
    try:
        encoder.set_input_size(img_size=(wanted, wanted))
    except Exception as err:  # noqa: BLE001
        raise UserError(f"img_size={wanted} does not fit the encoder trained at {trained_size}: {err}") from None
    return wanted
