"""From the decoder's normalized next-patch predictions back to pictures.

The image loss regresses per-patch normalized pixels (each patch minus its mean, over its std; see
`aimv2.objective.normalize_patches`), so a prediction says nothing about a patch's brightness or
contrast. As MAE's visualizations do, we undo the normalization with the *target* patch's own mean
and std: the picture then shows whether the predicted structure is right, while colour and contrast
come from the truth. Keep that in mind when reading the grids.
"""

from __future__ import annotations

import torch

from aimv2.objective import normalize_patches, patchify


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W); the exact inverse of `aimv2.objective.patchify`."""
    b = patches.shape[0]
    gh, gw = grid
    p = patch_size
    x = patches.reshape(b, gh, gw, p, p, channels)  # (B, gh, gw, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
    return x.reshape(b, channels, gh * p, gw * p)


def unnormalize_patches(normalized: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalized patches (B, N, P) back to pixel space using the statistics of `target` (B, N, P),
    the raw patches they were regressing: the inverse of `normalize_patches` for the truth."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, correction=1)  # as normalize_patches
    return normalized * (var + eps).sqrt() + mean


def to_pixels(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Model-space images (B, C, H, W), normalized with (mean, std) per channel, -> [0, 1] pixels."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images * std + mean).clamp(0, 1)


def prefix_mask(prefix_lengths: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, N) bool, True on the prefix patches (index < M)."""
    return torch.arange(num_patches, device=prefix_lengths.device)[None] < prefix_lengths[:, None]


def continuation(pixel_pred: torch.Tensor, images: torch.Tensor, prefix_lengths: torch.Tensor,
                 patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's continuation as patches in the images' own space, and the true patches.

    pixel_pred (B, N, P) normalized, where the output at position i predicts patch i + 1; images
    (B, C, H, W). Returns (predicted, target), both (B, N, P): predicted holds the given patches in the
    prefix (index < M, M >= 1) and, after it, patch j = the prediction made at position j - 1,
    un-normalized with patch j's statistics.
    """
    target = patchify(images.float(), patch_size)  # (B, N, P)
    shifted = torch.cat([pixel_pred[:, :1], pixel_pred[:, :-1]], dim=1).float()  # (B, N, P): row j predicts patch j
    predicted = unnormalize_patches(shifted, target)
    given = prefix_mask(prefix_lengths, target.shape[1])[..., None]  # (B, N, 1)
    return torch.where(given, target, predicted), target


def normalized_targets(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """What the image loss regresses: (B, N, P) per-patch normalized patches of `images`."""
    return normalize_patches(patchify(images.float(), patch_size))
