"""The frozen encoder of a probe, from a checkpoint, with the preprocessing it expects.

Every format `aimv2.load_encoder` reads works here (this project's .ckpt, a DeepSpeed ZeRO
directory, an `aimv2 export` directory, timm and transformers directories, Apple's release), so
`aimv2 probe checkpoint=...` accepts all of them. `Preprocessing` lives in aimv2.checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from timm.models.vision_transformer import VisionTransformer

from aimv2.checkpoints import Preprocessing, load_encoder, resize_encoder

__all__ = ["Preprocessing", "fit_resolution", "load_probe_encoder"]


def load_probe_encoder(path: str | Path) -> tuple[VisionTransformer, int, Preprocessing]:
    """(encoder in eval mode, the resolution of its weights, its preprocessing) from any checkpoint format."""
    encoder, preprocessing = load_encoder(path)
    return encoder, preprocessing.img_size, preprocessing


def fit_resolution(encoder: VisionTransformer, trained_size: int, wanted: int) -> int:
    """The resolution to feed: the encoder's own (wanted=0), or `wanted` when the encoder can take it
    (a multiple of its patch size; position embeddings are resampled). Else a UserError naming it."""
    if wanted in (0, trained_size):
        return trained_size
    resize_encoder(encoder, wanted, f"the encoder (trained at {trained_size}; img_size=0 uses that)")
    return wanted
