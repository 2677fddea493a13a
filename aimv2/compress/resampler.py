"""Flamingo's Perceiver Resampler (Alayrac et al. 2022, "Flamingo: a Visual Language Model for
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
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from aimv2.compress.base import Compressor, CompressorSpec, attention_width, refuse_old_weights


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
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, mult * width, bias=False), nn.GELU(),
                         nn.Linear(mult * width, width, bias=False))


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
        refuse_old_weights(self, "resampler", ("queries", "norm_kv.", "blocks."),
                           "learned queries that attended over the patches only, not over [patches; latents]")

    def forward(self, x: torch.Tensor, text: Optional[torch.Tensor] = None,
                keys: Optional[torch.Tensor] = None, grid: Optional[tuple[int, int]] = None) -> torch.Tensor:
        x = self.inp(x)  # (B, N, W)
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, M, W)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.proj(self.norm(latents))  # (B, M, D_llm)
