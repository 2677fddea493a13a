"""The AIMv2 objective: L = text_weight * L_text + alpha * L_img.

L_img: L2 regression of the next patch on per-patch normalized pixels (MAE's target), counted only
for targets outside the prefix. L_text: next-token cross-entropy, padding ignored.
alpha = 0 is the captioning-only baseline; text_weight = 0 is the image-only (AIMv1-like) objective.

Each term is computed as a (sum, count) pair (`LossSums`), and every mean is `mean_of(sum, count)`:
the batch means of one process (`aimv2_loss`, `packed_aimv2_loss`), and the global batch's mean under
data parallelism (`global_losses`), where the sums stay per rank and only the counts are global.
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


def mean_of(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count in total's dtype, the count clamped at 1: a term without targets is 0, not NaN."""
    return total / count.clamp_min(1).to(total.dtype)


def image_loss_sum(
    pred: torch.Tensor, target_patches: torch.Tensor, prefix_lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-patch L2 terms: (sum, count), both 0-dim float32 on pred's device.

    pred (B, N, P): output at position i predicts patch i+1. target_patches (B, N, P) normalized.
    Patch j (0-based) is a target when j >= M (outside the prefix of length M), so the prediction
    at position i counts when i + 1 >= M. `sum` adds the mean squared error over the P values of
    each counted (sample, patch) pair; `count` is the number of those pairs.
    """
    pred, target = pred[:, :-1], target_patches[:, 1:]  # (B, N-1, P): position i vs patch i+1
    target_idx = torch.arange(1, target_patches.shape[1], device=pred.device)  # (N-1,)
    # float32, not pred's dtype: a bf16 count is inexact above 256
    counted = (target_idx[None, :] >= prefix_lengths[:, None]).float()  # (B, N-1)
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N-1)
    return (per_patch * counted).sum(), counted.sum()


def image_loss(pred: torch.Tensor, target_patches: torch.Tensor, prefix_lengths: torch.Tensor) -> torch.Tensor:
    """`image_loss_sum`'s mean: over all counted (sample, patch, pixel) values of the batch."""
    return mean_of(*image_loss_sum(pred, target_patches, prefix_lengths))


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (n, V), targets (n,) -> (summed cross-entropy, n); n is known on the host: no device sync."""
    count = torch.full((), float(targets.shape[0]), device=logits.device)
    return F.cross_entropy(logits.float(), targets, reduction="sum"), count


def text_loss_sum(
    logits: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor, token_index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy terms: (sum over real tokens, number of real tokens), 0-dim float32;
    positions where token_mask is False are ignored.

    logits are (B, L, V), where logits[:, j] predicts tokens[:, j], or already (n, V) for the
    n True positions of token_mask (the decoder's packed output); token_index (n,), the flat
    positions of those, picks the targets without a device sync.
    """
    if logits.dim() == 2:
        targets = tokens.flatten().index_select(0, token_index) if token_index is not None else tokens[token_mask]
        return _cross_entropy_sum(logits, targets)
    targets = tokens.masked_fill(~token_mask, -100)
    total = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return total, token_mask.sum().float()


def text_loss(
    logits: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor, token_index: torch.Tensor | None = None
) -> torch.Tensor:
    """`text_loss_sum`'s mean over the batch's real tokens."""
    return mean_of(*text_loss_sum(logits, tokens, token_mask, token_index))


@dataclass
class Losses:
    total: torch.Tensor
    image: torch.Tensor
    text: torch.Tensor


@dataclass
class LossSums:
    """One batch's terms before averaging, 0-dim tensors: `image` and `text` are `image_loss_sum`'s and
    `text_loss_sum`'s sums (they carry the graph), `image_count` and `text_count` their counts."""

    image: torch.Tensor
    image_count: torch.Tensor
    text: torch.Tensor
    text_count: torch.Tensor

    def means(self, alpha: float, text_weight: float) -> Losses:
        """The batch means and total = text_weight * text + alpha * image."""
        l_img, l_text = mean_of(self.image, self.image_count), mean_of(self.text, self.text_count)
        return Losses(total=text_weight * l_text + alpha * l_img, image=l_img, text=l_text)


def summed_over_ranks(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each 0-dim value, detached, summed over every process of the default group: float64, one all-reduce
    (no host sync). The values must be on the device the backend reduces on (the model's)."""
    stacked = torch.stack([v.detach().to(torch.float64) for v in values])  # (len(values),)
    torch.distributed.all_reduce(stacked, op=torch.distributed.ReduceOp.SUM)
    return tuple(stacked.unbind())


def global_losses(sums: LossSums, alpha: float, text_weight: float, world_size: int) -> tuple[torch.Tensor, Losses]:
    """This rank's loss for backward, normalized by the global batch's counts, and the global batch's means.

    Returns (loss, logged). With S this rank's sums and C the counts summed over the `world_size` ranks
    (clamped at 1), loss = world_size * (text_weight * S_text / C_text + alpha * S_img / C_img): the data-parallel
    AVERAGE of the ranks' gradients (DDP, FSDP, FSDP2 and DeepSpeed all average over the data-parallel group) is
    then the gradient of the global batch's mean loss, every target weighing the same whichever rank drew it.
    `logged` holds the global batch's means (detached, float32, the same on every rank). One all-reduce of 4
    float64 values on the default process group (the data-parallel group under every strategy of this project);
    with world_size 1 no collective, and loss is `sums.means(alpha, text_weight).total`.

    Under gradient accumulation Lightning divides each micro-batch's loss by the number of micro-batches, so
    the normalization is global within each micro-batch: micro-batches weigh the same, whatever their counts.
    """
    if world_size == 1:
        losses = sums.means(alpha, text_weight)
        return losses.total, Losses(losses.total.detach(), losses.image.detach(), losses.text.detach())
    image, image_count, text, text_count = summed_over_ranks(sums.image, sums.image_count, sums.text, sums.text_count)
    share = LossSums(sums.image * world_size, image_count, sums.text * world_size, text_count)
    means = LossSums(image, image_count, text, text_count).means(alpha, text_weight)  # float64
    dtype = sums.image.dtype
    logged = Losses(means.total.to(dtype), means.image.to(dtype), means.text.to(dtype))
    return share.means(alpha, text_weight).total, logged


def global_mean(total: torch.Tensor, count: torch.Tensor, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logged) for a single summed term, as `global_losses`: loss = world_size * total / global count
    (clamped at 1), logged = the global mean, detached; with world_size 1, total / count and no collective."""
    if world_size == 1:
        loss = mean_of(total, count)
        return loss, loss.detach()
    all_total, all_count = summed_over_ranks(total, count)
    return mean_of(total * world_size, all_count), mean_of(all_total, all_count).to(total.dtype)


def aimv2_loss_sums(
    pixel_pred: torch.Tensor,
    logits: torch.Tensor,
    images: torch.Tensor,
    tokens: torch.Tensor,
    token_mask: torch.Tensor,
    prefix_lengths: torch.Tensor,
    patch_size: int,
    token_index: torch.Tensor | None = None,
) -> LossSums:
    """Both terms of a fixed-size batch: images (B, C, H, W), pixel_pred (B, N, P), logits as `text_loss_sum`."""
    target = normalize_patches(patchify(images.float(), patch_size))  # (B, N, P)
    return LossSums(
        *image_loss_sum(pixel_pred, target, prefix_lengths), *text_loss_sum(logits, tokens, token_mask, token_index)
    )


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
    """The batch means of `aimv2_loss_sums`."""
    return aimv2_loss_sums(
        pixel_pred, logits, images, tokens, token_mask, prefix_lengths, patch_size, token_index
    ).means(alpha, text_weight)


def packed_aimv2_loss_sums(
    pixel_pred: torch.Tensor,
    logits: torch.Tensor,
    patches: torch.Tensor,
    tokens: torch.Tensor,
    layout: dict,
    prefix_lengths: torch.Tensor,
) -> LossSums:
    """The same terms for packed rows (aimv2.models.native): patches (R, T, P) normalized pixels in
    patchify's order, pixel_pred (K, P) and logits (n_real, V) from `AIMv2.forward_packed`.
    Every image's terms are what `aimv2_loss_sums` computes for it alone; the sums and counts are over
    all its counted patches and all real tokens, as `aimv2_loss_sums` takes them over a fixed-size batch."""
    target = normalize_patches(patches.float().flatten(0, 1)[layout["pixel_target"]])  # (K, P)
    counted = (layout["pixel_target_pos"] >= prefix_lengths[layout["pixel_image"]]).float()  # (K,)
    per_patch = (pixel_pred.float() - target).pow(2).mean(dim=-1)  # (K,)
    text, text_count = _cross_entropy_sum(logits, tokens.flatten()[layout["text_target"]])
    return LossSums((per_patch * counted).sum(), counted.sum(), text, text_count)


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
    """The batch means of `packed_aimv2_loss_sums`."""
    return packed_aimv2_loss_sums(pixel_pred, logits, patches, tokens, layout, prefix_lengths).means(alpha, text_weight)
