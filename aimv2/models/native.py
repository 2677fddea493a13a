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

Where every token of a packed batch goes: the index tensors that let the model run several images
of any grid, with their captions, in one row, and score each exactly as if it were alone.

A batch is R rows. Encoder row r holds the patches of its images one after another (raster order per
image), then padding, T tokens in all. Decoder row r holds, per image in the same order, its projected
patches then its caption ([start, t_1 .. t_{l-1}] for a caption of l real tokens), then padding, S
tokens in all. Built on the host by the collator (no device sync in the step), used by
`AIMv2.forward_packed` and `packed_aimv2_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer

from aimv2.models.encoder import build_encoder
from aimv2.models.sizes import SizeSpec

TEMPERATURE = 10000.0


def sincos_position_embedding(
    rows: torch.Tensor, cols: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(..., dim) for integer patch coordinates `rows`, `cols` of any shape (the release's layout)."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / TEMPERATURE ** (torch.arange(quarter, dtype=torch.float64, device=rows.device) / quarter)
    angle_c = cols.to(torch.float64)[..., None] * omega  # (..., D/4)
    angle_r = rows.to(torch.float64)[..., None] * omega
    table = torch.cat([angle_c.sin(), angle_c.cos(), angle_r.sin(), angle_r.cos()], dim=-1)
    return table.to(dtype)


def grid_position_embedding(
    grid_h: int, grid_w: int, dim: int, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(grid_h, grid_w, dim) for a whole grid, row-major like timm's patch tokens."""
    rows, cols = torch.meshgrid(torch.arange(grid_h, device=device), torch.arange(grid_w, device=device), indexing="ij")
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


def encode_packed(encoder: VisionTransformer, patches: torch.Tensor, coords: torch.Tensor, attn_mask) -> torch.Tensor:
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


def pack_layout(
    grids: Sequence[tuple[int, int]],
    text_lengths: Sequence[int],
    rows: Sequence[Sequence[int]],
    row_tokens: int,
    text_len: int,
) -> dict[str, torch.Tensor]:
    """Index tensors for images with patch grids `grids` (gh, gw), captions of `text_lengths` real
    tokens (padded to `text_len`), placed in `rows` (lists of image indices, each image once) of
    `row_tokens` encoder tokens.

    Keys (long tensors; flat positions index the flattened (R*T) or (R*S) tensors):
      patch_image, patch_pos (R, T): image of each encoder token (-1: padding) and its raster index;
      coords (R, T, 2): its (row, column) in its image; image_start (n,): flat position of its patch 0;
      dec_source (R, S): where each decoder input comes from, in [patch features (R*T) | caption
        inputs (n*L) | a zero vector]; dec_image (R, S): its image (-1: padding);
      pixel_pred, pixel_target (K,): flat decoder position of patch j and flat encoder position of
        patch j+1 of the same image; pixel_image, pixel_target_pos (K,): that image and j+1;
      text_pred (n_real,): flat decoder positions of caption slots with a real target;
      text_target (n_real,): flat positions of those targets in the (n, L) tokens.
    """
    n = len(grids)
    placed = sorted(i for row in rows for i in row)
    if placed != list(range(n)):
        raise ValueError(f"every image must be placed exactly once; rows hold {placed} for {n} images")
    num_rows, t_len = len(rows), row_tokens
    patch_image = torch.full((num_rows, t_len), -1, dtype=torch.long)
    patch_pos = torch.zeros((num_rows, t_len), dtype=torch.long)
    coords = torch.zeros((num_rows, t_len, 2), dtype=torch.long)
    image_start = torch.zeros(n, dtype=torch.long)
    pad_source = num_rows * t_len + n * text_len
    dec_rows, dec_images = [], []
    pixel_pred, pixel_target, pixel_image, pixel_pos = [], [], [], []
    text_pred, text_target = [], []
    segments = []  # (row, decoder offset, image) to turn row offsets into flat positions once S is known
    for r, row in enumerate(rows):
        offset, sources, images = 0, [], []
        dec_offset = 0
        for i in row:
            gh, gw = grids[i]
            count, length = gh * gw, int(text_lengths[i])
            if count < 2:
                raise ValueError(f"image {i} has a {gh}x{gw} patch grid: at least 2 patches are needed")
            if not 1 <= length <= text_len:
                raise ValueError(f"image {i}: caption length {length} outside [1, {text_len}]")
            if offset + count > t_len:
                raise ValueError(f"row {r} holds {offset + count} patches, more than its {t_len} tokens")
            pos = torch.arange(count)
            patch_image[r, offset : offset + count] = i
            patch_pos[r, offset : offset + count] = pos
            coords[r, offset : offset + count, 0] = pos // gw
            coords[r, offset : offset + count, 1] = pos % gw
            start = r * t_len + offset
            image_start[i] = start
            sources += [start + pos, num_rows * t_len + i * text_len + torch.arange(length)]
            images.append(torch.full((count + length,), i, dtype=torch.long))
            segments.append((r, dec_offset, i, count, length, start))
            offset += count
            dec_offset += count + length
        dec_rows.append(torch.cat(sources) if sources else torch.zeros(0, dtype=torch.long))
        dec_images.append(torch.cat(images) if images else torch.zeros(0, dtype=torch.long))
    s_len = max(len(d) for d in dec_rows)
    dec_source = torch.full((num_rows, s_len), pad_source, dtype=torch.long)
    dec_image = torch.full((num_rows, s_len), -1, dtype=torch.long)
    for r, (src, img) in enumerate(zip(dec_rows, dec_images)):
        dec_source[r, : len(src)], dec_image[r, : len(img)] = src, img
    for r, dec_offset, i, count, length, start in segments:
        base = r * s_len + dec_offset
        j = torch.arange(count - 1)
        pixel_pred.append(base + j)
        pixel_target.append(start + j + 1)
        pixel_image.append(torch.full((count - 1,), i, dtype=torch.long))
        pixel_pos.append(j + 1)
        text_pred.append(base + count + torch.arange(length))
        text_target.append(i * text_len + torch.arange(length))
    return {
        "patch_image": patch_image,
        "patch_pos": patch_pos,
        "coords": coords,
        "image_start": image_start,
        "dec_source": dec_source,
        "dec_image": dec_image,
        "pixel_pred": torch.cat(pixel_pred),
        "pixel_target": torch.cat(pixel_target),
        "pixel_image": torch.cat(pixel_image),
        "pixel_target_pos": torch.cat(pixel_pos),
        "text_pred": torch.cat(text_pred),
        "text_target": torch.cat(text_target),
    }


def pack_patches(patches: Sequence[torch.Tensor], layout: dict[str, torch.Tensor]) -> torch.Tensor:
    """(R, T, P) rows from each image's (N_i, P) patches, at the places the layout gave them."""
    num_rows, t_len = layout["patch_image"].shape
    out = patches[0].new_zeros((num_rows * t_len, patches[0].shape[-1]))
    for i, p in enumerate(patches):
        start = int(layout["image_start"][i])
        out[start : start + p.shape[0]] = p
    return out.view(num_rows, t_len, -1)
