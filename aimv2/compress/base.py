"""What every compressor shares: its spec, the (B, N, D) <-> grid reshapes, the MLP into LLM width.

A compressor turns the encoder's N patch tokens (B, N, D_vis), laid out row-major on a
(gh, gw) grid, into M tokens in the LLM's embedding space (B, M, D_llm). AIMv2 has no class
token, so every one of the N tokens is a patch and none is treated specially (token 0 included).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from aimv2.errors import UserError


@dataclass(frozen=True)
class CompressorSpec:
    """Everything needed to rebuild a compressor (stored in checkpoints and export bundles)."""

    kind: str
    d_vis: int  # encoder width
    d_llm: int  # LLM embedding width
    grid: tuple[int, int]  # (gh, gw) patch grid; N = gh * gw
    num_tokens: int  # M
    hidden: int = 0  # MLP hidden / attention width; 0 = the kind's default
    heads: int = 4  # attention heads (attention-based kinds)
    layers: int = 2  # cross-attention blocks (resampler)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_dict(self) -> dict:
        return asdict(self) | {"grid": list(self.grid)}

    @classmethod
    def from_dict(cls, d: dict) -> CompressorSpec:
        return cls(**(dict(d) | {"grid": tuple(d["grid"])}))


class Compressor(nn.Module):
    """(B, N, D_vis) [+ text (B, D_llm)] [+ keys (B, N, D_k)] -> (B, M, D_llm)."""

    uses_text: ClassVar[bool] = False  # forward wants the query's text embedding (from the LLM)
    uses_keys: ClassVar[bool] = False  # forward wants the encoder's last attention keys
    flexible: ClassVar[bool] = False  # M may change after training (set_num_tokens) without new weights

    def __init__(self, spec: CompressorSpec):
        super().__init__()
        self.check_m(spec.kind, spec.num_tokens, spec.grid)
        self.spec = spec
        self.num_tokens = spec.num_tokens

    def text_parameters(self) -> list[nn.Parameter]:
        """The parameters only a text embedding reaches (none but for text-conditioned kinds)."""
        return []

    def set_num_tokens(self, m: int) -> None:
        """Change M in place (flexible kinds only: pooling and pruning have no per-M weights)."""
        if not self.flexible:
            raise UserError(
                f"compressor '{self.spec.kind}' has weights for M={self.spec.num_tokens} only; "
                "train one run per M (see eval/README.md)"
            )
        self.check_m(self.spec.kind, m, self.spec.grid)
        self.num_tokens = m

    @classmethod
    def check_m(cls, kind: str, m: int, grid: tuple[int, int]) -> None:
        """A UserError naming compressor.num_tokens when this kind cannot make M tokens on this grid."""
        check_num_tokens(kind, m, grid)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """`grid`: the (gh, gw) of these features when it is not the trained one (a native-resolution
        encoder takes any image size); None = spec.grid."""
        raise NotImplementedError

    def grid_of(self, x: torch.Tensor, grid: tuple[int, int] | None) -> tuple[int, int]:
        """The features' grid (spec.grid unless given), checked against their N and this kind's M."""
        grid = tuple(grid) if grid is not None else self.spec.grid
        if grid[0] * grid[1] != x.shape[1]:
            raise UserError(
                f"compressor {self.spec.kind}: {x.shape[1]} patch features do not form a {grid[0]}x{grid[1]} grid"
            )
        if grid != self.spec.grid:
            self.check_m(self.spec.kind, self.num_tokens, grid)
        return grid


def check_num_tokens(kind: str, m: int, grid: tuple[int, int], *, square: bool = False, divides: bool = False) -> None:
    """M in [1, N]; a perfect square for grid compressors; its side dividing the grid for region ones."""
    n = grid[0] * grid[1]
    key = "compressor.num_tokens"
    if not 1 <= m <= n:
        raise UserError(f"config key '{key}': {kind} needs 1 <= M <= N={n}, got {m}")
    side = math.isqrt(m)
    if (square or divides) and side * side != m:
        raise UserError(f"config key '{key}': {kind} pools to a sqrt(M) x sqrt(M) grid, so M must be a square, got {m}")
    if divides and (grid[0] % side or grid[1] % side):
        raise UserError(
            f"config key '{key}': {kind} needs sqrt(M)={side} to divide the {grid[0]}x{grid[1]} patch grid "
            f"(M in {region_token_counts(grid)})"
        )


def region_token_counts(grid: tuple[int, int]) -> list[int]:
    """The M a region compressor can make on this grid: s*s for every s dividing both sides."""
    return [s * s for s in range(1, min(grid) + 1) if grid[0] % s == 0 and grid[1] % s == 0]


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """LLaVA-1.5's projector shape: Linear, GELU, Linear."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


def to_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, D) row-major tokens -> (B, D, gh, gw) feature map."""
    b, n, d = x.shape
    return x.transpose(1, 2).reshape(b, d, grid[0], grid[1])


def from_grid(x: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B, h*w, D) row-major tokens."""
    return x.flatten(2).transpose(1, 2)


def pool_tokens(x: torch.Tensor, grid: tuple[int, int], m: int) -> torch.Tensor:
    """Average-pool (B, N, D) on its grid to a sqrt(M) x sqrt(M) grid: (B, M, D)."""
    side = math.isqrt(m)
    return from_grid(F.adaptive_avg_pool2d(to_grid(x, grid), (side, side)))


def to_regions(x: torch.Tensor, grid: tuple[int, int], side: int) -> torch.Tensor:
    """(B, N, D) -> (B * side*side, kh*kw, D): the patches of each of the side x side regions, in
    row-major region order (the order `pool_tokens` gives its outputs)."""
    b, _, d = x.shape
    kh, kw = grid[0] // side, grid[1] // side
    x = x.reshape(b, side, kh, side, kw, d)  # (B, sy, ky, sx, kx, D)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b * side * side, kh * kw, d)


def attention_width(spec: CompressorSpec) -> int:
    """Attention runs at `hidden` (default: the encoder width), which the heads must divide."""
    width = spec.hidden or spec.d_vis
    if width % spec.heads:
        raise UserError(
            f"config key 'compressor.heads': {spec.heads} heads do not divide the attention width {width} "
            "(compressor.hidden, default the encoder width)"
        )
    return width


def refuse_old_weights(module: nn.Module, kind: str, old_prefixes: Iterable[str], why: str) -> None:
    """Make `module.load_state_dict` (and any parent's) raise one UserError line, instead of loading
    or listing missing keys, when the state holds keys of a superseded form of this compressor."""
    old = tuple(old_prefixes)

    def hook(mod, state_dict, prefix, *args) -> None:
        found = sorted(
            k[len(prefix) :] for k in state_dict if k.startswith(prefix) and k[len(prefix) :].startswith(old)
        )
        if found:
            raise UserError(
                f"compressor {kind}: these weights are of its earlier form ({why}; keys like "
                f"{found[0]!r}); this version computes another function with them: retrain the compressor"
            )

    module.register_load_state_dict_pre_hook(hook)
