"""Weighted k-nearest-neighbour classification of frozen features (DINO's k-NN evaluation): no training,
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
