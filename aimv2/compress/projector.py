"""Per-token projectors: LLaVA's MLP (M = N) and average pooling to a sqrt(M) grid + MLP.

The pooled one follows Matryoshka Multimodal Models / MobileVLM LDPv2: pooling has no weights, so
one trained MLP serves every M (1, 4, 9, ..., N) and M can change after training
(`set_num_tokens`); training can draw M per step (`compressor.train_tokens`) to fit them jointly.
"""

from __future__ import annotations

from typing import Optional

import torch

from aimv2.compress.base import Compressor, CompressorSpec, check_num_tokens, mlp, pool_tokens
from aimv2.errors import UserError


class MLPProjector(Compressor):
    """LLaVA-1.5: Linear, GELU, Linear on every patch token; keeps all N tokens."""

    def __init__(self, spec: CompressorSpec):
        super().__init__(spec)
        self.proj = mlp(spec.d_vis, spec.hidden or spec.d_llm, spec.d_llm)

    @classmethod
    def check_m(cls, kind: str, m: int, grid: tuple[int, int]) -> None:
        n = grid[0] * grid[1]
        if m != n:
            raise UserError(f"config key 'compressor.num_tokens': mlp keeps all N={n} patch tokens, got {m} (use 0 for N)")

    def forward(self, x: torch.Tensor, text: Optional[torch.Tensor] = None,
                keys: Optional[torch.Tensor] = None, grid: Optional[tuple[int, int]] = None) -> torch.Tensor:
        return self.proj(x)  # (B, N, D_llm)


class PooledProjector(Compressor):
    """Average-pool the patch grid to sqrt(M) x sqrt(M), then the MLP: (B, N, D_vis) -> (B, M, D_llm)."""

    flexible = True

    def __init__(self, spec: CompressorSpec):
        super().__init__(spec)
        self.proj = mlp(spec.d_vis, spec.hidden or spec.d_llm, spec.d_llm)

    @classmethod
    def check_m(cls, kind: str, m: int, grid: tuple[int, int]) -> None:
        check_num_tokens(kind, m, grid, square=True)

    def forward(self, x: torch.Tensor, text: Optional[torch.Tensor] = None,
                keys: Optional[torch.Tensor] = None, grid: Optional[tuple[int, int]] = None) -> torch.Tensor:
        pooled = pool_tokens(x, self.grid_of(x, grid), self.num_tokens)  # (B, M, D_vis), any grid
        return self.proj(pooled)  # (B, M, D_llm)
