"""Gradient clipping by norm for every strategy and precision, through the LightningModule's
`configure_gradient_clipping` hook (the place Lightning documents for custom clipping).

Why not Lightning's own clipping: its mixed-precision plugin refuses to clip whenever the optimizer
unscales inside `step()` (any fused torch optimizer, which this project builds on every device),
even in bf16 where no loss scaler exists; and its FSDP precision plugin refuses clip-by-norm
altogether, because it has no handle on the root FSDP module (measured with lightning 2.6). So:

- DeepSpeed: nothing here; its engine clips with `gradient_clipping`, which Lightning sets from
  `Trainer(gradient_clip_val)`.
- FSDP: the root `FullyShardedDataParallel.clip_grad_norm_`, the norm over every rank's shard.
- everything else (single device, DDP): `torch.nn.utils.clip_grad_norm_` over the optimizer's
  parameters (DDP gradients are already all-reduced when the hook runs).

The hook runs after `on_before_optimizer_step` (the non-finite guard), before the step. With fp16
and a GradScaler the gradients must be unscaled before they are clipped: Lightning unscales before
this hook only for optimizers that do not unscale themselves, so fp16 gets an unfused AdamW
(`fused_optimizer_allowed`). bf16 needs no scaler and keeps the fused one.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy


def fused_optimizer_allowed(precision: str) -> bool:
    """A fused optimizer unscales fp16 gradients inside `step()`, after clipping would have seen them
    still scaled; only loss-scaled precisions rule it out."""
    return str(precision) not in ("16-mixed", "16")


def clip_gradient_norm(strategy: Strategy, optimizer: torch.optim.Optimizer, max_norm: float) -> Optional[torch.Tensor]:
    """Clip the gradients of `optimizer`'s parameters to total norm `max_norm` (0: no clipping); returns
    the total norm before clipping, or None where nothing was computed here (disabled, DeepSpeed)."""
    if not max_norm or max_norm <= 0 or isinstance(strategy, DeepSpeedStrategy):
        return None
    if isinstance(strategy, FSDPStrategy):
        return strategy.model.clip_grad_norm_(max_norm)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not params:
        return None
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


class ClipGradientNorm:
    """LightningModule mixin: clip by norm as `clip_gradient_norm` says, and log the norm before clipping
    as `train/grad_norm` (a rising norm is the first sign of an unstable run)."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        norm = clip_gradient_norm(self.trainer.strategy, optimizer, gradient_clip_val or 0.0)
        if norm is not None:
            self.log("train/grad_norm", norm)


def quiet_deepspeed_clipping_warning() -> None:
    """Lightning warns that an overridden clipping hook does not clip under DeepSpeed; ours knows and
    leaves clipping to DeepSpeed's engine."""
    warnings.filterwarnings("ignore", message=".*DeepSpeed handles gradient clipping internally.*")
