"""The AIMv2 objective: L = text_weight * L_text + alpha * L_img.

L_img: L2 regression of the next patch on per-patch normalized pixels (MAE's target), counted only
for targets outside the prefix. L_text: next-token cross-entropy, padding ignored.
alpha = 0 is the captioning-only baseline; text_weight = 0 is the image-only (AIMv1-like) objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major grid order (timm's token order),
    pixels inside a patch ordered (row, column, channel)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch minus its mean, divided by sqrt(var + eps) with the unbiased variance (divisor
    P - 1 over the P = p*p*3 values), exactly as MAE's `forward_loss` (models_mae.py) and ml-l3m's
    `RasterPixelLoss` (src/l3m/loss/mae_loss.py) compute it: `target.var(dim=-1)` is torch's default,
    correction=1. Over 588 values the two variances differ by 1/587 (targets 0.09% smaller)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, correction=1)
    return (patches - mean) / (var + eps).sqrt()


def image_loss(pred: torch.Tensor, target_patches: torch.Tensor, prefix_lengths: torch.Tensor) -> torch.Tensor:
    """Next-patch L2 loss.

    pred (B, N, P): output at position i predicts patch i+1. target_patches (B, N, P) normalized.
    Patch j (0-based) is a target when j >= M (outside the prefix of length M), so the prediction
    at position i counts when i + 1 >= M. The mean is over all counted (sample, patch, pixel) values.
    """
    pred, target = pred[:, :-1], target_patches[:, 1:]  # (B, N-1, P): position i vs patch i+1
    target_idx = torch.arange(1, target_patches.shape[1], device=pred.device)  # (N-1,)
    counted = (target_idx[None, :] >= prefix_lengths[:, None]).to(pred.dtype)  # (B, N-1)
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N-1)
    return (per_patch * counted).sum() / counted.sum().clamp_min(1)


def text_loss(logits: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
              token_index: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy; positions where token_mask is False are ignored.

    logits are (B, L, V), where logits[:, j] predicts tokens[:, j], or already (n, V) for the
    n True positions of token_mask (the decoder's packed output); token_index (n,), the flat
    positions of those, picks the targets without a device sync.
    """
    if logits.dim() == 2:
        targets = tokens.flatten().index_select(0, token_index) if token_index is not None else tokens[token_mask]
        return F.cross_entropy(logits.float(), targets)
    targets = tokens.masked_fill(~token_mask, -100)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


@dataclass
class Losses:
    total: torch.Tensor
    image: torch.Tensor
    text: torch.Tensor


def aimv2_loss(
    pixel_pred: torch.Tensor,
    logits: torch.Tensor,
    images: torch.Tensor,
    tokens: torch.Tensor,
    token_mask: torch.Tensor,
    prefix_lengths: torch.Tensor,
    patch_size: int,
    alpha: float = 0.4,
    text_weight: float = 1.0,
    token_index: torch.Tensor | None = None,
) -> Losses:
    target = normalize_patches(patchify(images.float(), patch_size))
    l_img = image_loss(pixel_pred, target, prefix_lengths)
    l_text = text_loss(logits, tokens, token_mask, token_index)
    return Losses(total=text_weight * l_text + alpha * l_img, image=l_img, text=l_text)


def packed_aimv2_loss(
    pixel_pred: torch.Tensor,
    logits: torch.Tensor,
    patches: torch.Tensor,
    tokens: torch.Tensor,
    layout: dict,
    prefix_lengths: torch.Tensor,
    alpha: float = 0.4,
    text_weight: float = 1.0,
) -> Losses:
    """The same losses for packed rows (aimv2.models.packing): patches (R, T, P) normalized pixels in
    patchify's order, pixel_pred (K, P) and logits (n_real, V) from `AIMv2.forward_packed`.
    Every term is what `aimv2_loss` computes for each image alone; the batch means are over all
    counted patches and all real tokens, as `aimv2_loss` takes them over a fixed-size batch."""
    target = normalize_patches(patches.float().flatten(0, 1)[layout["pixel_target"]])  # (K, P)
    counted = (layout["pixel_target_pos"] >= prefix_lengths[layout["pixel_image"]]).to(pixel_pred.dtype)
    per_patch = (pixel_pred.float() - target).pow(2).mean(dim=-1)  # (K,)
    l_img = (per_patch * counted).sum() / counted.sum().clamp_min(1)
    l_text = F.cross_entropy(logits.float(), tokens.flatten()[layout["text_target"]])
    return Losses(total=text_weight * l_text + alpha * l_img, image=l_img, text=l_text)
