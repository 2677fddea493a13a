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
