"""Frozen features from an encoder: patch tokens, pooled features and chosen intermediate blocks.

Eval mode, no grad, batched, on any device; one forward pass per batch (timm's
`forward_intermediates` returns the final tokens and the chosen blocks together). Results are
gathered on the CPU so a long extraction does not hold the accelerator's memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from timm.models.vision_transformer import VisionTransformer


@dataclass
class Features:
    tokens: torch.Tensor  # (B, N, D) last block after the final norm
    pooled: torch.Tensor  # (B, D) the encoder's own pooling of `tokens` (AIMv2: mean over patches)
    blocks: dict[int, torch.Tensor] = field(default_factory=dict)  # block index -> (B, N, D)


def _batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        return images.split(batch_size)  # (b, 3, H, W) views
    return images


@torch.no_grad()
def extract_features(
    encoder: VisionTransformer,
    images: torch.Tensor | Iterable[torch.Tensor],
    *,
    blocks: Sequence[int] = (),
    norm_blocks: bool = False,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
) -> Features:
    """Features of preprocessed `images` ((B, 3, H, W), or an iterable of such batches).

    `blocks`: block indices (negative counts from the end) whose outputs to return as well;
    `norm_blocks` passes them through the final norm, as the last block's tokens are.
    `device`: where to run (the encoder is moved there); default: where the encoder is.
    `amp_dtype`: e.g. torch.bfloat16 to run under autocast on a GPU (fp32 by default).
    The encoder's train/eval mode is restored afterwards.
    """
    depth = len(encoder.blocks)
    if any(not -depth <= b < depth for b in blocks):
        raise ValueError(f"blocks {list(blocks)} out of range for an encoder with {depth} blocks")
    wanted = sorted({b % depth for b in blocks})
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    was_training = encoder.training
    encoder.to(device).eval()
    tokens, pooled, inter = [], [], {b: [] for b in wanted}
    try:
        for batch in _batches(images, batch_size):
            x = batch.to(device, non_blocking=True)
            autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
            with autocast:
                if wanted:
                    final, outs = encoder.forward_intermediates(x, indices=wanted, norm=norm_blocks, output_fmt="NLC")
                    for b, out in zip(wanted, outs):
                        inter[b].append(out.float().cpu())
                else:
                    final = encoder.forward_features(x)  # (b, N, D)
                pool = encoder.forward_head(final, pre_logits=True)  # (b, D)
            tokens.append(final.float().cpu())
            pooled.append(pool.float().cpu())
    finally:
        encoder.train(was_training)
    if not tokens:
        raise ValueError("no images given")
    return Features(torch.cat(tokens), torch.cat(pooled), {b: torch.cat(v) for b, v in inter.items()})
