"""Compressors that keep the patch grid's order: the MLP projector (all N patches), the pooled projector,
and the training-free key-diversity pruner followed by the MLP.

Per-token projectors: LLaVA's MLP (M = N) and average pooling to a sqrt(M) grid + MLP.

The pooled one follows Matryoshka Multimodal Models / MobileVLM LDPv2: pooling has no weights, so
one trained MLP serves every M (1, 4, 9, ..., N) and M can change after training
(`set_num_tokens`); training can draw M per step (`compressor.train_tokens`) to fit them jointly.

Training-free pruning to M tokens by key diversity (AVIS's KDV score).

Methods such as PruMerge rank patches by their attention from the class token; AIMv2 has none.
KDV needs no anchor token: each patch is scored by how far its key (from the encoder's last
attention layer) points from the mean key, and the M most dissimilar patches are kept, in their
original grid order. Token 0 is a patch like any other: kept when it scores, dropped when not.
Selection has no weights (any M works after training); the kept tokens go through the MLP
projector, which is what trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
            raise UserError(
                f"config key 'compressor.num_tokens': mlp keeps all N={n} patch tokens, got {m} (use 0 for N)"
            )

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
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

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        pooled = pool_tokens(x, self.grid_of(x, grid), self.num_tokens)  # (B, M, D_vis), any grid
        return self.proj(pooled)  # (B, M, D_llm)


def kdv_scores(keys: torch.Tensor) -> torch.Tensor:
    """(B, N, D_k) -> (B, N): 1 - cos(key_i, mean key). Higher = more distinct."""
    mean = keys.mean(dim=1, keepdim=True)  # (B, 1, D_k)
    return 1.0 - F.cosine_similarity(keys, mean, dim=-1)


def kdv_select(keys: torch.Tensor, m: int) -> torch.Tensor:
    """Indices (B, M) of the M most diverse tokens, ascending (grid order kept for the LLM)."""
    top = kdv_scores(keys).topk(m, dim=1, sorted=False).indices  # (B, M)
    return top.sort(dim=1).values


class KDVPruner(Compressor):
    """Keep the M most diverse patches by key, project each with the MLP: (B, N, D_vis) -> (B, M, D_llm)."""

    uses_keys = True
    flexible = True

    def __init__(self, spec: CompressorSpec):
        super().__init__(spec)
        self.proj = mlp(spec.d_vis, spec.hidden or spec.d_llm, spec.d_llm)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        self.grid_of(x, grid)  # any grid with N >= M
        # Without the encoder's keys (a bare feature tensor), score the features themselves.
        idx = kdv_select(x if keys is None else keys, self.num_tokens)  # (B, M)
        kept = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, M, D_vis)
        return self.proj(kept)  # (B, M, D_llm)
