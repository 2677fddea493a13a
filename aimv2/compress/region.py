"""Region cross-attention: each of the M = s*s queries attends only to the k x k patches of its own
region of the grid (k = grid side / s), so the cost is O(N) instead of O(M * N).

- TokenPacker: the queries are the average-pooled (downsampled) grid itself.
- QueCC ("Inference Optimal VLMs Need Only One Visual Token but Larger Models"): the query text's
  embedding from the LLM is added to every patch feature first; a depthwise convolution with
  kernel = stride = k over those text-conditioned features makes the queries; each query
  attends to its own region of them; an MLP maps into the LLM width. Changing only the text
  changes the tokens.
TokenPacker proper attends to multi-level features; here the region keys are the last layer's.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from aimv2.compress.base import (Compressor, CompressorSpec, check_num_tokens, from_grid, mlp, pool_tokens,
                                 to_grid, to_regions)
from aimv2.compress.resampler import attention_width


class RegionAttention(nn.Module):
    """queries (B, M, D_vis), features (B, N, D_vis) -> (B, M, W): query i attends to region i only."""

    def __init__(self, d_vis: int, width: int, heads: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid
        self.q = nn.Linear(d_vis, width)
        self.kv = nn.Linear(d_vis, width)
        self.norm_q, self.norm_kv = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        b, m, _ = queries.shape
        side = math.isqrt(m)
        q = self.q(queries).reshape(b * m, 1, -1)  # (B*M, 1, W): one query per region
        kv = self.norm_kv(self.kv(to_regions(features, self.grid, side)))  # (B*M, k*k, W)
        out = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]  # (B*M, 1, W)
        return out.reshape(b, m, -1)


class _RegionCompressor(Compressor):
    """Region kinds: every query owns a whole k x k region, so sqrt(M) must divide the grid side."""

    @classmethod
    def check_m(cls, kind: str, m: int, grid: tuple[int, int]) -> None:
        check_num_tokens(kind, m, grid, divides=True)


class TokenPacker(_RegionCompressor):
    """Pooled grid queries, each refined by attention over its own region, then the MLP."""

    def __init__(self, spec: CompressorSpec):
        super().__init__(spec)
        width = attention_width(spec)
        self.region = RegionAttention(spec.d_vis, width, spec.heads, spec.grid)
        self.out = mlp(width, spec.d_llm, spec.d_llm)

    def forward(self, x: torch.Tensor, text: Optional[torch.Tensor] = None,
                keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        queries = pool_tokens(x, self.spec.grid, self.num_tokens)  # (B, M, D_vis), regions are exact here
        return self.out(self.region(queries, x))  # (B, M, D_llm)


class QueCC(_RegionCompressor):
    """Text-conditioned region compression: (B, N, D_vis) + text (B, D_llm) -> (B, M, D_llm)."""

    uses_text = True

    def __init__(self, spec: CompressorSpec):
        super().__init__(spec)
        width = attention_width(spec)
        side = math.isqrt(spec.num_tokens)
        kernel = (spec.grid[0] // side, spec.grid[1] // side)
        self.text_proj = nn.Linear(spec.d_llm, spec.d_vis)
        # Depthwise, kernel = stride = region size: one query per region, fixed M per weights.
        self.downsample = nn.Conv2d(spec.d_vis, spec.d_vis, kernel, stride=kernel, groups=spec.d_vis)
        self.region = RegionAttention(spec.d_vis, width, spec.heads, spec.grid)
        self.out = mlp(width, spec.d_llm, spec.d_llm)

    def text_parameters(self) -> list[nn.Parameter]:
        return list(self.text_proj.parameters())

    def forward(self, x: torch.Tensor, text: Optional[torch.Tensor] = None,
                keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        if text is not None:  # (B, D_llm) or (1, D_llm); None = unconditioned
            x = x + self.text_proj(text).unsqueeze(1)  # (B, N, D_vis)
        queries = from_grid(self.downsample(to_grid(x, self.spec.grid)))  # (B, M, D_vis)
        return self.out(self.region(queries, x))  # (B, M, D_llm)
