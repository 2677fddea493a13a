"""Compressors whose queries cross-attend to the patches: Flamingo's Perceiver Resampler (learned latents
over all patches) and the region compressors TokenPacker and QueCC (each query over its own region).

Flamingo's Perceiver Resampler (Alayrac et al. 2022, "Flamingo: a Visual Language Model for
Few-Shot Learning", Section 2.1 and Figure 5; as in the open implementations lucidrains/flamingo-pytorch
and mlfoundations/open_flamingo `PerceiverResampler`), then a Linear into the LLM width.

M learned latents (B, M, W) go through `compressor.layers` layers; in each:

    kv  = [LN_media(x); LN_latents(latents)]                  # (B, N + M, W): patches AND latents
    latents = latents + Attn(q=LN_latents(latents), k=kv, v=kv)
    latents = latents + FF(latents)                           # LN, Linear(W, 4W), GELU, Linear(4W, W)

then a final LayerNorm and Linear(W, D_llm). The latents are keys and values as well as queries,
so they exchange information with each other in every layer, not only read the patches. As in
those implementations the attention and feed-forward Linears have no bias and the latents start
from a standard normal. Differences, all for attaching to an LLM as a LLaVA-style front end:
no time / frame embeddings (one image, no video); the attention's inner width is W (head
dimension W / heads; theirs is heads x 64); features whose width is not W (`compressor.hidden`
set) enter through a Linear(D_vis, W); the final Linear into the LLM width (Flamingo's LLM reads
the latents through its own gated cross-attention instead). No position embedding is added to the
patches: AIMv2's patch features already carry their position. Each M has its own latents, so one
run per M; the attention takes any N, so any grid.

Weights of this toolkit's earlier `resampler` (latents attending over the patches only; keys
`queries`, `norm_kv.*`, `blocks.*`) are refused with a one-line error: they are not this function.

Region cross-attention: each of the M = s*s queries attends only to the k x k patches of its own
region of the grid (k = grid side / s), so the cost is O(N) instead of O(M * N).

- TokenPacker (Li et al. 2024, arXiv 2407.02392): the queries are the average-pooled (downsampled)
  grid itself, refined by their region's attention with a residual (query + attention): the
  pooled features stay in the token, the attention adds region detail. TokenPacker proper
  downsamples by bilinear interpolation, attends to multi-level features and has no residual
  (github.com/CircleRadon/TokenPacker); here average pooling, the last layer's features and the
  residual.
- QueCC ("Inference Optimal VLMs Need Only One Visual Token but Larger Models", arXiv 2411.03312):
  the query text's embedding from the LLM, projected by Linear + LayerNorm, is added to every
  patch feature; a depthwise convolution with kernel = stride = k over those text-conditioned
  features makes the queries; each query attends to its own region of the visual features
  *without* the text (keys and values never see it); an MLP maps the attention output into the
  LLM width. There is no residual around the attention, as in the authors' code
  (github.com/locuslab/llava-token-compression, llava/model/multimodal_projector/quecc.py, whose
  output is the attention output alone): before the MLP each token is the attention's output
  projection of a convex combination of its region's values (projected visual features), so the
  text steers what each region's query picks and never enters the token itself. Differences from
  their code: their query path and k/v projections are
  2-layer MLPs and their keys come from multi-level features; here linear projections and the
  last layer's features. An earlier version of this toolkit added the query back to the
  attention output (a residual, which let the text reach the tokens directly); its weights
  (keys `region.*`) are refused with a one-line error.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aimv2.compress.base import (
    Compressor,
    CompressorSpec,
    attention_width,
    check_num_tokens,
    from_grid,
    mlp,
    pool_tokens,
    refuse_old_weights,
    to_grid,
    to_regions,
)
from aimv2.errors import UserError


class PerceiverAttention(nn.Module):
    """Latents (B, M, W) attend over [LN(x); LN(latents)] (B, N + M, W) -> (B, M, W), no residual."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_kv = nn.Linear(width, 2 * width, bias=False)
        self.to_out = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        b, m, w = latents.shape
        latents = self.norm_latents(latents)  # (B, M, W)
        kv_in = torch.cat([self.norm_media(x), latents], dim=1)  # (B, N + M, W)
        k, v = self.to_kv(kv_in).chunk(2, dim=-1)  # (B, N + M, W) each
        q = self.to_q(latents)  # (B, M, W)
        q, k, v = (t.unflatten(-1, (self.heads, w // self.heads)).transpose(1, 2) for t in (q, k, v))  # (B, h, *, W/h)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, M, W/h): softmax(q k^T / sqrt(W/h)) v
        return self.to_out(out.transpose(1, 2).reshape(b, m, w))  # (B, M, W)


def feed_forward(width: int, mult: int = 4) -> nn.Sequential:
    """Flamingo's pre-norm feed-forward: LayerNorm, Linear(W, 4W), GELU, Linear(4W, W), no biases."""
    return nn.Sequential(
        nn.LayerNorm(width),
        nn.Linear(width, mult * width, bias=False),
        nn.GELU(),
        nn.Linear(mult * width, width, bias=False),
    )


class PerceiverLayer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = PerceiverAttention(width, heads)
        self.ff = feed_forward(width)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(x, latents)  # (B, M, W)
        return latents + self.ff(latents)


class Resampler(Compressor):
    """(B, N, D_vis) -> Perceiver Resampler with M learned latents -> (B, M, D_llm)."""

    def __init__(self, spec: CompressorSpec):
        super().__init__(spec)
        width = attention_width(spec)
        self.inp = nn.Linear(spec.d_vis, width) if width != spec.d_vis else nn.Identity()
        self.latents = nn.Parameter(torch.randn(spec.num_tokens, width))  # (M, W)
        self.layers = nn.ModuleList(PerceiverLayer(width, spec.heads) for _ in range(max(1, spec.layers)))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, spec.d_llm)
        refuse_old_weights(
            self,
            "resampler",
            ("queries", "norm_kv.", "blocks."),
            "learned queries that attended over the patches only, not over [patches; latents]",
        )

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        x = self.inp(x)  # (B, N, W)
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, M, W)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.proj(self.norm(latents))  # (B, M, D_llm)


class RegionAttention(nn.Module):
    """queries (B, M, D_vis), features (B, N, D_vis) -> (B, M, W): query i attends to region i only;
    `residual`: add the projected query to the attention output (TokenPacker here) or not (QueCC)."""

    def __init__(self, d_vis: int, width: int, heads: int, grid: tuple[int, int], residual: bool = True):
        super().__init__()
        self.grid, self.residual = grid, residual
        self.q = nn.Linear(d_vis, width)
        self.kv = nn.Linear(d_vis, width)
        self.norm_q, self.norm_kv = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(
        self, queries: torch.Tensor, features: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """`grid`: the features' grid when not the trained one (the regions follow it)."""
        b, m, _ = queries.shape
        side = math.isqrt(m)
        q = self.q(queries).reshape(b * m, 1, -1)  # (B*M, 1, W): one query per region
        kv = self.norm_kv(self.kv(to_regions(features, grid or self.grid, side)))  # (B*M, k*k, W)
        out = self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]  # (B*M, 1, W)
        if self.residual:
            out = q + out
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

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        grid = self.grid_of(x, grid)  # any grid whose sides sqrt(M) divides
        queries = pool_tokens(x, grid, self.num_tokens)  # (B, M, D_vis), regions are exact here
        return self.out(self.region(queries, x, grid))  # (B, M, D_llm)


class QueCC(_RegionCompressor):
    """Text-conditioned region compression: (B, N, D_vis) + text (B, D_llm) -> (B, M, D_llm).
    Only the queries see the text; keys and values are the visual features alone."""

    uses_text = True

    def __init__(self, spec: CompressorSpec):
        super().__init__(spec)
        width = attention_width(spec)
        side = math.isqrt(spec.num_tokens)
        kernel = (spec.grid[0] // side, spec.grid[1] // side)
        # The paper's code projects the text with Linear + LayerNorm (eps 1e-6) before adding it.
        self.text_proj = nn.Linear(spec.d_llm, spec.d_vis)
        self.text_norm = nn.LayerNorm(spec.d_vis, eps=1e-6)
        # Depthwise, kernel = stride = region size: one query per region, fixed M per weights.
        self.downsample = nn.Conv2d(spec.d_vis, spec.d_vis, kernel, stride=kernel, groups=spec.d_vis)
        # No residual, as the paper's code; named apart from the residual form's `region` (refused below).
        self.region_attn = RegionAttention(spec.d_vis, width, spec.heads, spec.grid, residual=False)
        self.out = mlp(width, spec.d_llm, spec.d_llm)
        refuse_old_weights(
            self,
            "quecc",
            ("region.",),
            "a residual added each query to its attention output, which the paper's QueCC does not have",
        )

    def text_parameters(self) -> list[nn.Parameter]:
        return [*self.text_proj.parameters(), *self.text_norm.parameters()]

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        if grid is not None and tuple(grid) != self.spec.grid:
            raise UserError(
                f"compressor quecc: its depthwise kernel was trained for the {self.spec.grid[0]}x"
                f"{self.spec.grid[1]} patch grid; features of a {grid[0]}x{grid[1]} grid need a "
                "compressor trained at that grid (or a kind that takes any grid: mlp, pool, resampler, "
                "kdv, tokenpacker)"
            )
        conditioned = x  # text (B, D_llm) or (1, D_llm); None = unconditioned
        if text is not None:
            conditioned = x + self.text_norm(self.text_proj(text)).unsqueeze(1)  # (B, N, D_vis)
        queries = from_grid(self.downsample(to_grid(conditioned, self.spec.grid)))  # (B, M, D_vis)
        return self.out(self.region_attn(queries, x))  # keys/values: x without the text; (B, M, D_llm)
