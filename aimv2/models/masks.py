"""Prefix attention for pre-training (AIMv2 / AIMv1).

Per sample a prefix length M is drawn uniformly from {1, ..., N-1}. Query q may attend to key k
when k is in the prefix (k < M) or k is not in the future (k <= q): the prefix block is
bidirectional, the rest is causal. At inference no mask is used (fully bidirectional).
"""

from __future__ import annotations

import torch


def sample_prefix_lengths(
    batch_size: int, num_patches: int, *, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B,) int64 prefix lengths, uniform in [1, N-1]."""
    return torch.randint(1, num_patches, (batch_size,), device=device, generator=generator)


def sample_prefix_lengths_per_image(num_patches: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) int64 prefix lengths, each uniform in [1, N_i - 1] for its image's N_i patches (N_i >= 2)."""
    draws = torch.rand(num_patches.shape, generator=generator, dtype=torch.float64)
    return 1 + (draws * (num_patches - 1)).long().clamp_max(num_patches - 2)


def prefix_attention_mask(prefix_lengths: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, N, N); True means "may attend". Broadcasts over heads."""
    idx = torch.arange(num_patches, device=prefix_lengths.device)
    causal = idx[None, :] <= idx[:, None]  # (N, N): key <= query
    in_prefix = idx[None, None, :] < prefix_lengths[:, None, None]  # (B, 1, N): key in prefix
    return (causal[None] | in_prefix).unsqueeze(1)  # (B, 1, N, N)


def prefix_attention_bias(prefix_lengths: torch.Tensor, num_patches: int,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The same mask as an additive bias (B, 1, N, N): 0 where allowed, -inf elsewhere.

    For its memory-efficient and math kernels SDPA converts a boolean mask to this form inside every
    call, in every layer; built once per step, the bias is shared by all layers instead. On the
    2-core CPU the two measure the same within noise, about 5% over an unmasked call
    (benchmarks/results/attention.md). Every row keeps key 0 (M >= 1), so no row is all -inf.
    """
    allowed = prefix_attention_mask(prefix_lengths, num_patches)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=prefix_lengths.device)
    return bias.masked_fill_(~allowed, float("-inf"))


# -- packed rows (native resolution): several images per row, none attending to another ----------
def packed_encoder_mask(patch_image: torch.Tensor, patch_pos: torch.Tensor,
                        prefix_lengths: torch.Tensor | None) -> torch.Tensor:
    """Boolean (R, 1, T, T) for packed encoder rows; True means "may attend".

    patch_image (R, T): the image each token belongs to (-1: padding); patch_pos (R, T): its raster
    index in that image; prefix_lengths (n,): each image's M, or None for full (inference) attention.
    Within an image: the prefix rule above; across images: nothing. A padding token attends to itself
    only, so no row is empty (its output is ignored)."""
    same = (patch_image[:, :, None] == patch_image[:, None, :]) & (patch_image[:, :, None] >= 0)  # (R, T, T)
    if prefix_lengths is not None:
        m = prefix_lengths[patch_image.clamp_min(0)]  # (R, T): each query's image's M
        key, query = patch_pos[:, None, :], patch_pos[:, :, None]
        same = same & ((key < m[:, :, None]) | (key <= query))
    eye = torch.eye(patch_image.shape[1], dtype=torch.bool, device=patch_image.device)
    return (same | eye).unsqueeze(1)


def packed_decoder_mask(dec_image: torch.Tensor) -> torch.Tensor:
    """Boolean (R, 1, S, S) for packed decoder rows: causal within each image's segment (its patches,
    then its caption, contiguous in the row), nothing across segments; padding attends to itself."""
    same = (dec_image[:, :, None] == dec_image[:, None, :]) & (dec_image[:, :, None] >= 0)
    idx = torch.arange(dec_image.shape[1], device=dec_image.device)
    causal = idx[None, :] <= idx[:, None]
    eye = torch.eye(dec_image.shape[1], dtype=torch.bool, device=dec_image.device)
    return ((same & causal) | eye).unsqueeze(1)


def as_bias(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A boolean mask as an additive SDPA bias (0 / -inf), built once and shared by every layer."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def packed_encoder_block_mask(patch_image: torch.Tensor, patch_pos: torch.Tensor,
                              prefix_lengths: torch.Tensor | None):
    """`packed_encoder_mask` as a FlexAttention BlockMask (GPU training; aimv2.models.attention)."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, length = patch_image.shape
    m = (prefix_lengths[patch_image.clamp_min(0)] if prefix_lengths is not None
         else torch.full_like(patch_image, length))  # full attention: every key counts as prefix

    def mask_mod(b, h, q, k):
        same = (patch_image[b, q] == patch_image[b, k]) & (patch_image[b, q] >= 0)
        visible = (patch_pos[b, k] < m[b, q]) | (patch_pos[b, k] <= patch_pos[b, q])
        return (same & visible) | (q == k)

    return create_block_mask(mask_mod, rows, None, length, length, device=patch_image.device)


def packed_decoder_block_mask(dec_image: torch.Tensor):
    """`packed_decoder_mask` as a FlexAttention BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, length = dec_image.shape

    def mask_mod(b, h, q, k):
        return ((dec_image[b, q] == dec_image[b, k]) & (dec_image[b, q] >= 0) & (k <= q)) | (q == k)

    return create_block_mask(mask_mod, rows, None, length, length, device=dec_image.device)
