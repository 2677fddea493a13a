"""The AIMv2 encoder: timm's `aimv2_*` VisionTransformer, built from a row of the size table.

We deliberately do not write another ViT: timm's model already has the AIMv2 layout (RMSNorm after
the patch projection and after the last block, SwiGLU, no biases) and converts Apple's released
weights, so every checkpoint we write is a timm checkpoint.
"""

from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from aimv2.models.attention import Attention
from aimv2.models.masks import prefix_attention_bias
from aimv2.models.sizes import SizeSpec


def timm_encoder_kwargs(spec: SizeSpec, img_size: int) -> dict:
    """Keyword arguments that turn `timm.create_model(spec.timm_arch, ...)` into this encoder."""
    # int(width * ratio) must give exactly mlp_hidden: the half keeps float rounding from losing one.
    return dict(
        embed_dim=spec.width,
        depth=spec.depth,
        num_heads=spec.heads,
        mlp_ratio=(spec.mlp_hidden + 0.5) / spec.width,
        patch_size=spec.patch_size,
        img_size=img_size,
        num_classes=0,
    )


def build_encoder(spec: SizeSpec, img_size: int = 224, **timm_kwargs) -> VisionTransformer:
    if img_size % spec.patch_size:
        raise ValueError(f"image size {img_size} is not a multiple of the patch size {spec.patch_size}")
    # Our Attention subclass: timm's, which also takes FlexAttention block masks (aimv2.models.attention).
    kwargs = timm_encoder_kwargs(spec, img_size) | {"attn_layer": Attention} | timm_kwargs
    return timm.create_model(spec.timm_arch, pretrained=False, **kwargs)


def grid_of(encoder: VisionTransformer, images: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of patches `images` (..., H, W) give: the nominal grid at the fixed size, any
    grid for a native encoder (aimv2.models.native)."""
    p = encoder.patch_embed.patch_size
    return images.shape[-2] // p[0], images.shape[-1] // p[1]


def encode(encoder: VisionTransformer, images: torch.Tensor, prefix_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Patch features (B, N, D) after the final norm; prefix attention when lengths are given."""
    mask = None
    if prefix_lengths is not None:
        # In the activations' dtype; under autocast SDPA casts it together with q, k and v.
        dtype = images.dtype if images.is_floating_point() else torch.float32
        gh, gw = grid_of(encoder, images)
        mask = prefix_attention_bias(prefix_lengths.to(images.device), gh * gw, dtype)
    return encoder.forward_features(images, attn_mask=mask)
