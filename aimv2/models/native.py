"""Native resolution: one encoder for every patch grid, and packed rows of several images.

Position information. AIMv2's native release adds a fixed 2-D sin-cos embedding computed for the
grid at hand (transformers' `Aimv2VisionEmbeddings` with `is_native=True`) instead of a learned
(1, N, D) table: any grid works without resampling, and a packed token needs only its own
(row, column). The layout is the release's: per patch `[sin(c w) | cos(c w) | sin(r w) | cos(r w)]`
with w_k = 10000^(-k / (D/4)), k < D/4, for column c and row r (computed in float64).

The encoder stays timm's `aimv2_*` VisionTransformer (same parameter names, so every checkpoint is a
timm one without `pos_embed`): `SinCosPatchEmbed` is timm's PatchEmbed (conv, then RMSNorm, as the
release orders them) that adds the embedding of the grid it produced; the model is built with
`pos_embed='none'` and `dynamic_img_size=True` so that any H x W divisible by the patch size passes.

Packed rows (`encode_packed`) skip the conv: a patch flattened in (row, column, channel) order
(aimv2.objective.patchify's order, which the targets use too) times the conv kernel in the same order
is the conv's output for that patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer

from aimv2.models.encoder import build_encoder
from aimv2.models.sizes import SizeSpec

TEMPERATURE = 10000.0


def sincos_position_embedding(rows: torch.Tensor, cols: torch.Tensor, dim: int,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., dim) for integer patch coordinates `rows`, `cols` of any shape (the release's layout)."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / TEMPERATURE ** (torch.arange(quarter, dtype=torch.float64, device=rows.device) / quarter)
    angle_c = cols.to(torch.float64)[..., None] * omega  # (..., D/4)
    angle_r = rows.to(torch.float64)[..., None] * omega
    table = torch.cat([angle_c.sin(), angle_c.cos(), angle_r.sin(), angle_r.cos()], dim=-1)
    return table.to(dtype)


def grid_position_embedding(grid_h: int, grid_w: int, dim: int, device=None,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(grid_h, grid_w, dim) for a whole grid, row-major like timm's patch tokens."""
    rows, cols = torch.meshgrid(torch.arange(grid_h, device=device), torch.arange(grid_w, device=device),
                                indexing="ij")
    return sincos_position_embedding(rows, cols, dim, dtype)


class SinCosPatchEmbed(PatchEmbed):
    """timm's patch embedding plus the sin-cos embedding of its output grid (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)  # (B, gh, gw, D): NHWC, the format timm uses with dynamic_img_size
        if x.dim() != 4:
            raise RuntimeError("SinCosPatchEmbed needs the encoder built with dynamic_img_size=True")
        return x + grid_position_embedding(x.shape[1], x.shape[2], x.shape[3], x.device, x.dtype)


# What turns timm's aimv2 VisionTransformer into a native one (also used by aimv2.checkpoints.arch).
NATIVE_TIMM_KWARGS = {"embed_layer": SinCosPatchEmbed, "pos_embed": "none", "dynamic_img_size": True}


def build_native_encoder(spec: SizeSpec, img_size: int = 224) -> VisionTransformer:
    """A timm aimv2 encoder for any grid; `img_size` is only its nominal size (timm's pretrained_cfg)."""
    return build_encoder(spec, img_size, **NATIVE_TIMM_KWARGS)


def is_native(encoder: VisionTransformer) -> bool:
    return isinstance(encoder.patch_embed, SinCosPatchEmbed)


def patch_kernel(encoder: VisionTransformer) -> torch.Tensor:
    """The patch conv as a (D, p*p*3) matrix over patches flattened in (row, column, channel) order."""
    weight = encoder.patch_embed.proj.weight  # (D, 3, p, p)
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def encode_packed(encoder: VisionTransformer, patches: torch.Tensor, coords: torch.Tensor,
                  attn_mask) -> torch.Tensor:
    """patches (R, T, p*p*3) normalized pixels, coords (R, T, 2) each token's (row, column) in its own
    image, attn_mask (R, 1, T, T) additive bias (aimv2.models.masks.packed_encoder_bias) or a
    FlexAttention BlockMask -> features (R, T, D) after the final norm, as forward_features gives for
    each image alone."""
    embed = encoder.patch_embed
    x = F.linear(patches, patch_kernel(encoder), embed.proj.bias)  # (R, T, D)
    x = embed.norm(x)
    x = x + sincos_position_embedding(coords[..., 0], coords[..., 1], x.shape[-1], x.dtype)
    x = encoder.norm_pre(x)
    for block in encoder.blocks:
        x = block(x, attn_mask=attn_mask)
    return encoder.norm(x)
