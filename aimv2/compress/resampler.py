"""Learned-query cross-attention resampler (Flamingo's Perceiver Resampler / BLIP-2's Q-Former).

M learned queries attend to all N patch tokens through a few pre-norm cross-attention blocks;
any M from 1 up works, but each M has its own queries, so one run per M. No position embedding is
added to the keys: AIMv2's patch features already carry their position.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from aimv2.compress.base import Compressor, CompressorSpec, mlp
from aimv2.errors import UserError


class CrossAttentionBlock(nn.Module):
    """Pre-norm: q += Attn(LN(q), kv, kv); q += MLP(LN(q)). kv is normed once by the caller."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = mlp(width, 4 * width, width)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]  # (B, M, W)
        return q + self.mlp(self.norm_mlp(q))


def attention_width(spec: CompressorSpec) -> int:
    """Attention runs at `hidden` (default: the encoder width), which the heads must divide."""
    width = spec.hidden or spec.d_vis
    if width % spec.heads:
        raise UserError(f"config key 'compressor.heads': {spec.heads} heads do not divide the attention width {width} "
                        "(compressor.hidden, default the encoder width)")
    return width


class Resampler(Compressor):
    """(B, N, D_vis) -> M learned queries cross-attending to the patches -> (B, M, D_llm)."""

    def __init__(self, spec: CompressorSpec):
        super().__init__(spec)
        width = attention_width(spec)
        self.inp = nn.Linear(spec.d_vis, width)
        self.norm_kv = nn.LayerNorm(width)
        self.queries = nn.Parameter(torch.randn(spec.num_tokens, width) * 0.02)  # (M, W)
        self.blocks = nn.ModuleList(CrossAttentionBlock(width, spec.heads) for _ in range(max(1, spec.layers)))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, spec.d_llm))

    def forward(self, x: torch.Tensor, text: Optional[torch.Tensor] = None,
                keys: Optional[torch.Tensor] = None, grid: Optional[tuple[int, int]] = None) -> torch.Tensor:
        kv = self.norm_kv(self.inp(x))  # (B, N, W)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, M, W)
        for block in self.blocks:
            q = block(q, kv)
        return self.out(q)  # (B, M, D_llm)
