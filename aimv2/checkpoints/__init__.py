"""Checkpoints as encoders: detect a checkpoint's format, load it as a timm encoder with its
preprocessing, convert between weight layouts, export for timm and transformers, extract features.

    from aimv2 import load_encoder
    encoder, pre = load_encoder("runs/demo/pretrain/checkpoints/last.ckpt")   # or any other format
"""

from aimv2.checkpoints.export import EXPORT_FORMATS, export_checkpoint
from aimv2.checkpoints.feature_extraction import Features, extract_features
from aimv2.checkpoints.formats import FORMATS, detect_format, read_checkpoint
from aimv2.checkpoints.loading import (
    LoadedEncoder,
    Pretrained,
    load_checkpoint,
    load_decoder,
    load_encoder,
    load_pretrained,
    resize_encoder,
)
from aimv2.checkpoints.preprocessing import Preprocessing

__all__ = [
    "EXPORT_FORMATS",
    "FORMATS",
    "Features",
    "LoadedEncoder",
    "Preprocessing",
    "Pretrained",
    "detect_format",
    "export_checkpoint",
    "extract_features",
    "load_checkpoint",
    "load_decoder",
    "load_encoder",
    "load_pretrained",
    "read_checkpoint",
    "resize_encoder",
]
