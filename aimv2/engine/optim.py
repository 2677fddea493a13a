"""The optimizer recipe of AIMv2 (Table A1): AdamW with fully decoupled weight decay, no decay on
norms, biases, position embeddings and the start token; linear warmup then cosine decay to a
minimum learning rate.

Fully decoupled weight decay (AIMv2 Table A1; Apple's ml-l3m `AdamLH`, src/l3m/optim/adamw_lh.py):
every step a decayed weight is multiplied by (1 - lambda * lr_t / lr_init), where lr_init is the lr
the optimizer was built with (the peak of the schedule) and lambda = `optim.weight_decay` (1e-4 in
the paper). The shrink per step follows the schedule but not the size of the peak lr: 1e-4 per
step at the peak whatever lr is. torch's AdamW multiplies by (1 - lr_t * wd), so the same decay is
torch's AdamW (or DeepSpeed's CPU Adam in adamw mode, the same form) with wd = lambda / lr_init:
`decoupled_weight_decay`. Passing lambda itself would decay lr_init times too weakly (1000x at 1e-3).

Gradient clipping by norm for every strategy and precision, through the LightningModule's
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

import math
import warnings

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "start_token")


# Prefixes that wrappers (FSDP, activation checkpointing, torch.compile) add to parameter names.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters without weight decay, decided on the unwrapped model: under FSDP the
    parameters the optimizer sees are flat 1-D shards, so their shapes no longer tell."""
    return {
        clean_name(name)
        for name, param in model.named_parameters()
        if param.ndim < 2 or any(key in name for key in NO_DECAY_NAMES)
    }


def param_groups(model: nn.Module, weight_decay: float, no_decay: set[str] | None = None) -> list[dict]:
    """[decayed, not decayed] trainable parameters of `model`. Pass `no_decay` (from `no_decay_names`,
    taken before wrapping) whenever `model` may already be wrapped: without it the split is decided on
    the shapes seen now, and FSDP's flat 1-D shards would all land in the no-decay group."""
    no_decay_set = no_decay_names(model) if no_decay is None else no_decay
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if clean_name(name) in no_decay_set else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def decoupled_weight_decay(lam: float, init_lr: float) -> float:
    """torch AdamW's `weight_decay` that gives AdamLH's decay p *= 1 - lam * lr_t / init_lr.

    One value for every parameter group, as in AdamLH, whose `init_lr` is the optimizer's own lr, not
    a group's: a group stepped at s x the lr (the compressor's LLM at `lm_lr_scale`) also decays at
    s x lam per step at the peak. With init_lr = 0 nothing moves: lr_t is 0 at every step, so is the
    decay (AdamLH itself would divide by zero)."""
    if lam < 0 or init_lr < 0:
        raise ValueError(f"weight decay {lam} and lr {init_lr} must be >= 0")
    return lam / init_lr if init_lr > 0 else 0.0


def warmup_cosine(
    step: int, warmup_steps: int, total_steps: int, lr: float, min_lr: float, start_lr: float | None = None
) -> float:
    """Learning rate at `step` (0-based): a linear warmup to lr, then cosine to min_lr.

    The warmup starts at `start_lr` at step 0 and reaches lr at step `warmup_steps`, as ml-l3m's
    `LinearParamScheduler(start_value=1e-6)` does (configs/aimv2/001_aimv2_hfdata.yaml; start_lr above
    lr is lowered to lr). Without start_lr it is lr * (step + 1) / warmup_steps (the probe's and the
    compressor's: no step at lr ~ 0)."""
    if step < warmup_steps:
        if start_lr is None:
            return lr * (step + 1) / warmup_steps
        start = min(start_lr, lr)
        return start + (lr - start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def adamw(groups: list[dict], lr: float, betas, eps: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over parameter groups; fused (unless `fused=False`: fp16 with a loss scaler, see
    aimv2.engine.optim) whenever every parameter sits on one CUDA or CPU device.

    The fused kernel (CUDA, and the CPU since torch 2.4) updates every tensor in one pass: on the
    2-core bench machine it stepped 56M parameters in 28 ms where foreach took 277 ms. It also
    honours `found_inf`, which lets the non-finite guard skip a step without a host sync."""
    devices = {p.device.type for group in groups for p in group["params"]}
    fused = fused and len(devices) == 1 and devices <= {"cuda", "cpu"}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def optimizer_options(trainer) -> dict:
    """How a job's optimizer must be built under `trainer` (its strategy and precision), as the keyword
    arguments of `make_optimizer` / `build_optimizer`: `cpu_adam` where DeepSpeed offloads the optimizer
    (ZeRO-Offload refuses a torch optimizer: "You are using ZeRO-Offload with a client provided
    optimizer", deepspeed 0.19 runtime/engine.py), `fused` unless a loss scaler needs the gradients
    unscaled before clipping (aimv2.engine.optim). Every job that trains under Lightning uses it."""
    from aimv2.engine.trainer import offloads_optimizer

    return {
        "cpu_adam": offloads_optimizer(getattr(trainer, "strategy", None)),
        "fused": fused_optimizer_allowed(trainer.precision),
    }


def make_optimizer(
    groups: list[dict], lr: float, betas, eps: float, cpu_adam: bool = False, fused: bool = True
) -> torch.optim.Optimizer:
    """AdamW over parameter groups (each may carry its own `lr` and `weight_decay`): DeepSpeed's CPU Adam
    in adamw mode when the strategy offloads the optimizer (its states then live in CPU memory), else
    torch's AdamW (`adamw`). Both decay as torch does, so the groups are the same either way."""
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=tuple(betas), eps=eps, adamw_mode=True)
    return adamw(groups, lr, betas, eps, fused=fused)


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas,
    eps: float,
    no_decay: set[str] | None = None,
    cpu_adam: bool = False,
    fused: bool = True,
) -> torch.optim.Optimizer:
    """The pre-training optimizer; `weight_decay` is the paper's lambda, applied fully decoupled.
    `no_decay`: the names `no_decay_names` gave on the model before any wrapper (FSDP) flattened it."""
    groups = param_groups(model, decoupled_weight_decay(weight_decay, lr), no_decay)
    return make_optimizer(groups, lr, betas, eps, cpu_adam=cpu_adam, fused=fused)


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    lr: float,
    min_lr: float,
    start_lr: float | None = None,
) -> dict:
    """Lightning's lr_scheduler entry: `warmup_cosine` per optimizer step, scaling each group's own lr
    (groups may start from different rates). Warm-up is cut to leave at least one decaying step.
    lr = 0 (then min_lr = 0 too, as the config checks) keeps every rate at 0: no update, no decay."""
    warmup = min(warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        return warmup_cosine(step, warmup, total_steps, lr, min_lr, start_lr) / lr if lr > 0 else 0.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"scheduler": scheduler, "interval": "step"}


def fused_optimizer_allowed(precision: str) -> bool:
    """A fused optimizer unscales fp16 gradients inside `step()`, after clipping would have seen them
    still scaled; only loss-scaled precisions rule it out."""
    return str(precision) not in ("16-mixed", "16")


def clip_gradient_norm(strategy: Strategy, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor | None:
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
