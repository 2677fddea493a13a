"""Scale-out from the config: the Lightning strategy object, and the switches applied to the model
from outside (the model code in aimv2/models stays single-device).

- auto: Lightning's choice (one device: no wrapper; several: DDP).
- ddp: DDPStrategy, a full replica per device, gradients all-reduced.
- fsdp: FSDPStrategy, every transformer block (timm `Block`, encoder and decoder) one FSDP unit,
  fully sharded; checkpoints are one consolidated file.
- deepspeed: DeepSpeedStrategy, ZeRO stage `trainer.zero_stage` (2: optimizer states and gradients
  sharded; 3: parameters too); `trainer.offload` puts optimizer states (stage 3: and parameters) in
  CPU memory; checkpoints are directories.

Activation checkpointing wraps the same blocks (FSDP through its own policy, the others with
torch's non-reentrant checkpoint wrapper, which keeps state_dict keys unchanged), and
`trainer.compile` compiles each block in place (no `_orig_mod.` in the keys either). Every strategy
writes checkpoints atomically (aimv2.engine.checkpoint_io). Lightning refuses FSDP and DeepSpeed
on the CPU accelerator: on CPU machines only `auto` and `ddp` run.
"""

from __future__ import annotations

import logging
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    Strategy,
)
import torch
from timm.models.vision_transformer import Block
from torch import nn

from aimv2.config import TrainerConfig
from aimv2.engine.checkpoint_io import AtomicCheckpointIO
from aimv2.engine.clipping import quiet_deepspeed_clipping_warning
from aimv2.fileio import publish_directory

log = logging.getLogger(__name__)
BLOCKS = {Block}  # the transformer blocks of both the encoder (timm VisionTransformer) and the decoder


class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
    """ZeRO checkpoints are directories written by every rank; write them under a temporary name and
    rename once all ranks are done, so a killed save never leaves a half-written `step=N.ckpt/`."""

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Optional[Any] = None) -> None:
        final = Path(self.broadcast(str(filepath)))
        tmp = final.with_name(f".{final.name}.tmp")
        if self.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier("aimv2_ckpt_tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("aimv2_ckpt_written")
        if self.is_global_zero:
            publish_directory(tmp, final, fsync=False)  # DeepSpeed's own writes, as before this class
        self.barrier("aimv2_ckpt_renamed")


def build_strategy(cfg: TrainerConfig, batch_size: Optional[int] = None) -> Strategy | str:
    """The Lightning strategy for `cfg.strategy` (validated by TrainerConfig.validate)."""
    if cfg.strategy == "ddp":
        # No buffer broadcast: the model has no running statistics, and the data counters kept in
        # buffers are per-rank totals summed when logged.
        return DDPStrategy(broadcast_buffers=False, gradient_as_bucket_view=True, checkpoint_io=AtomicCheckpointIO())
    if cfg.strategy == "fsdp":
        return FSDPStrategy(
            auto_wrap_policy=BLOCKS,
            activation_checkpointing_policy=BLOCKS if cfg.activation_checkpointing else None,
            sharding_strategy="FULL_SHARD",
            cpu_offload=cfg.offload,
            state_dict_type="full",  # one file, loadable anywhere; gathered on rank 0 at save time
            limit_all_gathers=True,
            checkpoint_io=AtomicCheckpointIO(),
        )
    if cfg.strategy == "deepspeed":
        quiet_deepspeed_clipping_warning()  # DeepSpeed's engine clips (aimv2.engine.clipping)
        return AtomicDeepSpeedStrategy(
            stage=cfg.zero_stage,
            offload_optimizer=cfg.offload,
            offload_parameters=cfg.offload and cfg.zero_stage == 3,
            pin_memory=cfg.offload,
            logging_batch_size_per_gpu=batch_size or 1,
        )
    return "auto"


def strategy_plugins(cfg: TrainerConfig) -> list:
    """Plugins for `Trainer(plugins=...)`: atomic checkpoint writes when Lightning picks the strategy,
    and the mixed-precision plugin (`precision_plugin`)."""
    return ([AtomicCheckpointIO()] if cfg.strategy == "auto" else []) + ([precision] if (precision := precision_plugin(cfg)) else [])


def precision_plugin(cfg: TrainerConfig):
    """Autocast for `bf16-mixed` / `16-mixed` under auto and DDP, built here rather than from the string:
    given the string on a CPU, Lightning silently trains `16-mixed` as bf16; built explicitly, fp16
    autocast with a GradScaler runs where it was asked for (FSDP and DeepSpeed keep their own plugins)."""
    if cfg.precision not in ("bf16-mixed", "16-mixed") or cfg.strategy not in ("auto", "ddp"):
        return None
    from lightning.pytorch.plugins.precision import MixedPrecision

    accelerator = str(cfg.accelerator)
    device = "cpu" if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()) else "cuda"
    return MixedPrecision(cfg.precision, device)


def prepare_model(model: nn.Module, cfg: TrainerConfig) -> nn.Module:
    """Compile and/or checkpoint the transformer blocks in place, before the strategy wraps the model."""
    blocks = [m for m in model.modules() if isinstance(m, tuple(BLOCKS))]
    if cfg.compile:
        for block in blocks:
            block.compile()  # in place: parameter names and checkpoints are unchanged
    if cfg.activation_checkpointing and cfg.strategy != "fsdp":  # FSDP applies its own policy after wrapping
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl,
            apply_activation_checkpointing,
            checkpoint_wrapper,
        )

        apply_activation_checkpointing(
            model, checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda m: isinstance(m, tuple(BLOCKS)))
    return model


def offloads_optimizer(strategy: Strategy) -> bool:
    """DeepSpeed with optimizer offload needs its CPU Adam (a client torch optimizer is refused)."""
    if not isinstance(strategy, DeepSpeedStrategy):
        return False
    zero = (strategy.config or {}).get("zero_optimization", {})
    return bool(zero.get("offload_optimizer"))


def skips_nonfinite_itself(strategy: Strategy) -> bool:
    """DeepSpeed's ZeRO optimizer checks gradients for inf/NaN and skips the step itself (bf16 and fp16)."""
    return isinstance(strategy, DeepSpeedStrategy)
