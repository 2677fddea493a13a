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

Weighted k-nearest-neighbour classification of frozen features (DINO's k-NN evaluation): no training,
one pass over the train features.

The rule (Caron et al. 2021, facebookresearch/dino eval_knn.py): features are L2-normalised, so the dot
product is the cosine similarity; each val image takes its k most similar train images, each neighbour
votes for its class with the weight exp(similarity / T) (T = 0.07), the votes are summed per class, and
the class with the largest sum is the prediction (a tie goes to the lowest class index). One pass gives
every k of a list: the neighbours are kept sorted, and the k nearest are the first k of the largest k's.

Memory, bounded for ImageNet-size train sets: the train features arrive in chunks (`train`, an iterable
of (features, labels)) and are never held whole. What is held: the val features (V x D), the running
top-k_max similarities and labels of every val image (V x k_max, float + int64), one train chunk
(n x D) and one similarity block (val_block x n). So memory grows with the val set and the chunk size,
not with the number of train images: ImageNet-1k with a ViT-L (V = 50k, D = 1024, 8192-row chunks) holds
about 200 MB of val features, 12 MB of neighbours and 64 MB per block, however many train images stream
past. Time is one (V x D) @ (D x N_train) product in blocks.

Device-agnostic: everything runs on `device` (default: the val features' device); chunks are moved
there as they come, so features cached on the CPU are classified on a GPU when one is given.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

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


TEMPERATURE = 0.07  # DINO's
KS = (10, 20)  # DINO reports both


@torch.no_grad()
def knn_predict(
    train: Iterable[tuple[torch.Tensor, torch.Tensor]],
    val: torch.Tensor,
    num_classes: int,
    ks: Iterable[int] = KS,
    temperature: float = TEMPERATURE,
    device: torch.device | str | None = None,
    val_block: int = 1024,
) -> dict[int, torch.Tensor]:
    """{k: class votes (V, num_classes)} of every val row against the train rows streamed in `train`
    (chunks of features (n, D) and labels (n,)). With fewer than k train rows, all of them vote."""
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    device = torch.device(device) if device is not None else val.device
    queries = F.normalize(val.to(device, torch.float32), dim=1)  # (V, D)
    k_max, rows = ks[-1], len(queries)
    best_sim = torch.full((rows, k_max), float("-inf"), device=device)  # (V, k_max), sorted descending
    best_label = torch.zeros((rows, k_max), dtype=torch.long, device=device)  # (V, k_max)
    for features, labels in train:
        if len(labels) == 0:
            continue
        keys = F.normalize(features.to(device, torch.float32), dim=1)  # (n, D)
        labels = labels.to(device, torch.long)  # (n,)
        take = min(k_max, len(labels))
        for start in range(0, rows, val_block):
            block = slice(start, start + val_block)
            sim, index = (queries[block] @ keys.T).topk(take, dim=1)  # (b, n) -> (b, take)
            merged_sim = torch.cat([best_sim[block], sim], dim=1)  # (b, k_max + take)
            merged_label = torch.cat([best_label[block], labels[index]], dim=1)
            best_sim[block], order = merged_sim.topk(k_max, dim=1)  # sorted: the k nearest come first
            best_label[block] = merged_label.gather(1, order)
    votes = {}
    for k in ks:
        weight = (best_sim[:, :k] / temperature).exp()  # (V, k); exp(-inf) = 0: no vote from an empty slot
        votes[k] = torch.zeros(rows, num_classes, device=device).scatter_add_(1, best_label[:, :k], weight)
    return votes


def knn_accuracy(votes: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 (%) of class votes (V, C) against labels (V,)."""
    labels = labels.to(votes.device)
    top = votes.topk(min(5, votes.shape[1]), dim=1).indices  # (V, 5)
    hit = top == labels[:, None]
    return {
        "top1": round(100.0 * hit[:, 0].float().mean().item(), 2),
        "top5": round(100.0 * hit.any(1).float().mean().item(), 2),
    }


def pool(features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Image vectors (B, D) in float32: pooled features as they are; tokens (B, N, D) averaged, over the
    first `lengths` of each row when tokens are padded (native resolution). The linear probe's input."""
    features = features.float()
    if features.dim() == 2:
        return features
    if lengths is None:
        return features.mean(1)
    lengths = lengths.to(features.device)
    positions = torch.arange(features.shape[1], device=features.device)  # (N,)
    mask = (positions[None, :] < lengths[:, None]).to(features.dtype)  # (B, N)
    return (features * mask[..., None]).sum(1) / lengths[:, None].clamp(min=1).to(features.dtype)


def cached_rows(
    path: str | Path, max_bytes: int = 256 << 20, max_rows: int = 8192
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A probe feature cache (aimv2.probe.features: `features` (N, D) or (N, tokens, D), `labels`, maybe
    `lengths`) read in chunks of pooled rows: at most `max_rows` rows and about `max_bytes` of cached
    features per read, so a token cache larger than memory streams through."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        labels = f.get_tensor("labels")
        lengths = f.get_tensor("lengths") if "lengths" in names else None
        features = f.get_slice("features")
        shape = features.get_shape()
        per_row = 4 * max(1, int(torch.tensor(shape[1:]).prod().item()))
        step = max(1, min(max_rows, max_bytes // per_row))
        for start in range(0, shape[0], step):
            stop = min(start + step, shape[0])
            yield pool(features[start:stop], None if lengths is None else lengths[start:stop]), labels[start:stop]


def knn_on_cache(
    train: str | Path,
    val: str | Path,
    num_classes: int,
    ks: Iterable[int] = KS,
    temperature: float = TEMPERATURE,
    device: torch.device | str = "cpu",
) -> dict[str, dict]:
    """{"k=10": {"top1", "top5"}, ...}: the weighted k-NN of a probe run's cached val features against
    its cached train features (both files of aimv2.probe.features)."""
    val_rows = list(cached_rows(val))
    val_features = torch.cat([f for f, _ in val_rows])  # (V, D)
    val_labels = torch.cat([y for _, y in val_rows])
    votes = knn_predict(cached_rows(train), val_features, num_classes, ks, temperature, device)
    return {str(k): knn_accuracy(v, val_labels) for k, v in votes.items()}
