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


def sample_prefix_lengths_per_image(
    num_patches: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(n,) int64 prefix lengths, each uniform in [1, N_i - 1] for its image's N_i patches (N_i >= 2)."""
    draws = torch.rand(num_patches.shape, generator=generator, dtype=torch.float64)
    return 1 + (draws * (num_patches - 1)).long().clamp_max(num_patches - 2)


def prefix_attention_mask(prefix_lengths: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, N, N); True means "may attend". Broadcasts over heads."""
    idx = torch.arange(num_patches, device=prefix_lengths.device)
    causal = idx[None, :] <= idx[:, None]  # (N, N): key <= query
    in_prefix = idx[None, None, :] < prefix_lengths[:, None, None]  # (B, 1, N): key in prefix
    return (causal[None] | in_prefix).unsqueeze(1)  # (B, 1, N, N)


def prefix_attention_bias(
    prefix_lengths: torch.Tensor, num_patches: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
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
def packed_encoder_mask(
    patch_image: torch.Tensor, patch_pos: torch.Tensor, prefix_lengths: torch.Tensor | None
) -> torch.Tensor:
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


# -- the same masks as FlexAttention BlockMasks, from per-block summaries: no (T, T) tensor is built --------
# In every layout of aimv2.models.native an image is one contiguous run of its row (in the decoder: its
# patches, then its caption) and patch_pos counts 0, 1, ... along it; the order of images in a row does not
# matter (the packer places them longest first). Under that, the keys query t may see form one interval
# [lo_t, hi_t]: encoder [start, max(t, min(start + M - 1, end))] (M: its image's prefix length; none: the
# whole image), decoder [start, t], padding [t, t]. Every interval holds t itself, so over a block of
# consecutive queries their union is the interval [min lo, max hi]: a (query block, key block) pair is
# non-empty exactly when that interval meets the key block, and full exactly when every query's interval
# covers it (max lo <= first key and min hi >= last key).
def _runs(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last token index (R, T) of each token's run of equal image ids; a padding token (-1) is
    a run of its own."""
    rows, length = image.shape
    idx = torch.arange(length, device=image.device).expand(rows, length)  # (R, T)
    pad = image < 0
    differs = image[:, 1:] != image[:, :-1]  # (R, T-1): a new run starts at t+1
    first = torch.ones_like(pad)
    first[:, 1:] = differs
    last = torch.ones_like(pad)
    last[:, :-1] = differs
    start = torch.where(first | pad, idx, 0).cummax(-1).values
    end = torch.where(last | pad, idx, length).flip(-1).cummin(-1).values.flip(-1)
    return start, end


def _interval_block_mask(lo: torch.Tensor, hi: torch.Tensor, block_size: int):
    """A BlockMask where query t of row b sees exactly the keys lo[b, t] <= k <= hi[b, t] (both (R, T),
    lo <= t <= hi), built from per-block minima and maxima: O(R T + R (T / block_size)^2) memory."""
    from torch.nn.attention.flex_attention import BlockMask

    rows, length = lo.shape
    blocks = -(-length // block_size)
    # the last block may be short: repeat its last token, which leaves the block's minima and maxima as they are
    idx = torch.arange(blocks * block_size, device=lo.device).clamp_max(length - 1)
    lo_b, hi_b = lo[:, idx].view(rows, blocks, block_size), hi[:, idx].view(rows, blocks, block_size)
    min_lo, max_lo = lo_b.amin(-1)[:, :, None], lo_b.amax(-1)[:, :, None]  # (R, Qb, 1)
    min_hi, max_hi = hi_b.amin(-1)[:, :, None], hi_b.amax(-1)[:, :, None]
    first = torch.arange(blocks, device=lo.device) * block_size  # (Kb,): first key of each block
    last = (first + block_size).clamp_max(length) - 1  # its last (existing) key
    any_visible = (min_lo <= last) & (max_hi >= first)  # (R, Qb, Kb)
    # a short last block holds positions past T, never visible: it is full in neither direction (as
    # create_block_mask decides, which pads the dense mask with False)
    whole = first + block_size <= length  # (Kb,)
    full = (max_lo <= first) & (min_hi >= last) & whole & whole[:, None]
    partial = any_visible & ~full

    def ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, 1, Qb) counts and (R, 1, Qb, Kb) key block indices, the marked ones first in order."""
        dense = dense.to(torch.int32)
        indices = dense.argsort(dim=-1, descending=True, stable=True).to(torch.int32)
        return dense.sum(-1, dtype=torch.int32)[:, None], indices[:, None]

    def mask_mod(b, h, q, k):
        return (lo[b, q] <= k) & (k <= hi[b, q])

    return BlockMask.from_kv_blocks(
        *ordered(partial), *ordered(full), BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(length, length)
    )


def packed_encoder_block_mask(
    patch_image: torch.Tensor, patch_pos: torch.Tensor, prefix_lengths: torch.Tensor | None, block_size: int = 128
):
    """`packed_encoder_mask` as a FlexAttention BlockMask (GPU training; aimv2.models.encoder), for a
    layout of aimv2.models.native: each image one contiguous run, so patch_pos (0, 1, ... along it) is
    implied by patch_image and not read. Its non-empty and full blocks are exactly those of the dense
    mask; built without a device sync."""
    start, end = _runs(patch_image)  # (R, T) each
    if prefix_lengths is None:
        hi = end  # full attention: the whole image
    else:
        m = prefix_lengths[patch_image.clamp_min(0)]  # (R, T): each token's image's M
        idx = torch.arange(patch_image.shape[1], device=patch_image.device)
        hi = torch.maximum(idx, torch.minimum(start + m - 1, end))  # padding: end = t, so hi = t
    return _interval_block_mask(start, hi, block_size)


def packed_decoder_block_mask(dec_image: torch.Tensor, block_size: int = 128):
    """`packed_decoder_mask` as a FlexAttention BlockMask (each image's segment one contiguous run),
    with exactly the dense mask's non-empty and full blocks; built without a device sync."""
    start, _ = _runs(dec_image)
    idx = torch.arange(dec_image.shape[1], device=dec_image.device)
    return _interval_block_mask(start, idx.expand_as(start).contiguous(), block_size)
