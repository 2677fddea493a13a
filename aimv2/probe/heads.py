"""Probe heads, batched: H heads of one kind live in stacked parameters and run as one module.

Why batched: the grid (7 lr x 2 wd by default) shares one frozen forward pass, so the heads must
cost little next to the encoder. Stacking their weights turns 14 small modules into a few einsums.

- Attentive probe (AIMv1's head): non-affine BatchNorm over the patch tokens, attention pooling
  with one learned query (k and v projections, no bias; `A` attention heads, by default as many as
  the frozen trunk has: AIMv1's protocol, apple/ml-aim aim-v1/aim/v1/torch/models.py builds the
  head with the trunk's num_heads, and AIMv2's release keeps 8 for the 8-head L), then a linear
  classifier. The query-key product is reassociated exactly: q.(W_k x) = (W_k^T q).x, and the
  value projection is applied after pooling: sum_n a_n W_v x_n = W_v (sum_n a_n x_n). Same
  parameters, same outputs and gradients as the textbook form, but O(N D A) per head instead of
  O(N D^2), so 14 heads stay cheap next to the encoder.
- Linear probe: mean-pooled tokens, non-affine BatchNorm, linear classifier.

A non-affine BatchNorm has no parameters, and every head sees the same input, so one BatchNorm
is shared by all heads: its statistics would be identical in each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def encoder_attention_heads(encoder: nn.Module) -> int:
    """The frozen trunk's own number of attention heads (timm ViT: blocks[0].attn.num_heads), the
    attentive probe's default (`head.attention_heads: 0`); 8 for AIMv2-L, whose width // 64 is 16."""
    try:
        return int(encoder.blocks[0].attn.num_heads)
    except (AttributeError, IndexError, TypeError):
        from aimv2.errors import UserError

        raise UserError(
            "config key 'head.attention_heads': the encoder does not say its number of attention "
            "heads (blocks[0].attn.num_heads); set it"
        ) from None


class AttentiveHeads(nn.Module):
    """H attentive probes. tokens (B, N, D) -> logits (B, H, C)."""

    kind = "attentive"

    def __init__(self, num_heads: int, dim: int, num_classes: int, attention_heads: int = 1):
        super().__init__()
        a = attention_heads
        if a < 1 or dim % a:
            raise ValueError(f"attention_heads={a} does not divide the feature width {dim}")
        self.H, self.D, self.A, self.C = num_heads, dim, a, num_classes
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.query = nn.Parameter(torch.empty(num_heads, dim))  # (H, D), one query per probe
        self.k = nn.Parameter(torch.empty(num_heads, dim, dim))  # (H, D_out, D_in), no bias
        self.v = nn.Parameter(torch.empty(num_heads, dim, dim))
        self.weight = nn.Parameter(torch.empty(num_heads, num_classes, dim))  # (H, C, D)
        self.bias = nn.Parameter(torch.zeros(num_heads, num_classes))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Every probe starts from the same draw: the grid then differs only by its hyper-parameters.
        one = lambda shape, std: torch.randn(shape) * std  # noqa: E731
        bound = self.D**-0.5
        self.query.copy_(one((self.D,), 0.02).expand(self.H, -1))
        self.k.copy_((torch.rand(self.D, self.D) * 2 - 1).mul(bound).expand(self.H, -1, -1))
        self.v.copy_((torch.rand(self.D, self.D) * 2 - 1).mul(bound).expand(self.H, -1, -1))
        self.weight.copy_(one((self.C, self.D), 0.01).expand(self.H, -1, -1))
        self.bias.zero_()

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """lengths (B,): real tokens per row when rows are zero-padded (native resolution); padding
        enters neither the BatchNorm statistics nor the attention."""
        B, N, D = tokens.shape
        H, A, c = self.H, self.A, D // self.A
        if lengths is None:
            x = self.bn(tokens.reshape(B * N, D)).reshape(B, N, D)  # (B, N, D)
        else:
            real = torch.arange(N, device=tokens.device)[None, :] < lengths[:, None]  # (B, N)
            x = torch.zeros_like(tokens)
            x[real] = self.bn(tokens[real])
        q = self.query.reshape(H, A, c)  # (H, A, c)
        # u[h, a] = W_k[h, a-th block]^T q[h, a]: the query pulled back through the key projection.
        u = torch.einsum("hac,hacd->had", q, self.k.reshape(H, A, c, D))  # (H, A, D)
        scores = torch.einsum("bnd,had->bhan", x, u) * c**-0.5  # (B, H, A, N)
        if lengths is not None:
            scores = scores.masked_fill(~real[:, None, None, :], float("-inf"))
        attn = scores.softmax(dim=-1)
        pooled = torch.einsum("bhan,bnd->bhad", attn, x)  # (B, H, A, D)
        out = torch.einsum("bhad,hacd->bhac", pooled, self.v.reshape(H, A, c, D)).reshape(B, H, D)
        return torch.einsum("bhd,hcd->bhc", out, self.weight) + self.bias  # (B, H, C)


class LinearHeads(nn.Module):
    """H linear probes. tokens (B, N, D) or pooled features (B, D) -> logits (B, H, C)."""

    kind = "linear"

    def __init__(self, num_heads: int, dim: int, num_classes: int):
        super().__init__()
        self.H, self.D, self.C = num_heads, dim, num_classes
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.weight = nn.Parameter(torch.empty(num_heads, num_classes, dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, num_classes))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.copy_((torch.randn(self.C, self.D) * 0.01).expand(self.H, -1, -1))
        self.bias.zero_()

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if features.dim() == 3 and lengths is not None:  # zero-padded rows: the mean of the real tokens
            pooled = features.sum(dim=1) / lengths[:, None].to(features.dtype)
        else:
            pooled = features.mean(dim=1) if features.dim() == 3 else features  # (B, D)
        x = self.bn(pooled)
        return torch.einsum("bd,hcd->bhc", x, self.weight) + self.bias  # (B, H, C)


def build_heads(kind: str, num_heads: int, dim: int, num_classes: int, attention_heads: int = 1) -> nn.Module:
    if kind == "attentive":
        return AttentiveHeads(num_heads, dim, num_classes, attention_heads)
    if kind == "linear":
        return LinearHeads(num_heads, dim, num_classes)
    raise ValueError(f"unknown head kind {kind!r}")


def reference_attentive(tokens: torch.Tensor, heads: AttentiveHeads, h: int) -> torch.Tensor:
    """Probe `h` of `heads` in the textbook form (project k and v, then attend); for tests."""
    B, N, D = tokens.shape
    A, c = heads.A, D // heads.A
    x = F.batch_norm(
        tokens.reshape(B * N, D),
        heads.bn.running_mean,
        heads.bn.running_var,
        training=heads.bn.training,
        eps=heads.bn.eps,
    ).reshape(B, N, D)
    k = (x @ heads.k[h].T).reshape(B, N, A, c).transpose(1, 2)  # (B, A, N, c)
    v = (x @ heads.v[h].T).reshape(B, N, A, c).transpose(1, 2)
    q = heads.query[h].reshape(1, A, 1, c).expand(B, -1, -1, -1)  # (B, A, 1, c)
    pooled = F.scaled_dot_product_attention(q, k, v).reshape(B, D)
    return pooled @ heads.weight[h].T + heads.bias[h]
