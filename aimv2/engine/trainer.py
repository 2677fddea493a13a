"""Build the Lightning Trainer of a run: loggers, checkpoints and limits from `TrainerConfig`, in the
run directory layout of aimv2.engine.run_dir (checkpoints written atomically: aimv2.engine.checkpointing).

Scale-out from the config: the Lightning strategy object, and the switches applied to the model
from outside (the model code in aimv2/models stays single-device).

- auto: Lightning's choice (one device: no wrapper; several: DDP).
- ddp: DDPStrategy, a full replica per device, gradients all-reduced.
- fsdp: FSDPStrategy, every transformer block (timm `Block`, encoder and decoder) one FSDP unit,
  fully sharded; checkpoints are one consolidated file.
- deepspeed: DeepSpeedStrategy, ZeRO stage `trainer.zero_stage` (2: optimizer states and gradients
  sharded; 3: parameters too); `trainer.offload` puts optimizer states (stage 3: and parameters) in
  CPU memory; checkpoints are directories.
- fsdp2: FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning's ModelParallelStrategy
  (`FSDP2Strategy`): every transformer block one unit, then the AIMv2 model as the root (torchtitan's
  order), parameters as DTensors sharded on dim 0 over all processes. The sharding is applied from
  outside in the LightningModule's `configure_model` hook (`shard_model`). Checkpoints are
  torch.distributed.checkpoint directories (each rank writes its own shards, no gather on rank 0),
  in Lightning's layout, resumable at another world size and convertible to one file
  (aimv2.checkpoints.dcp, `aimv2 checkpoint convert`). Lightning 2.6.6 does not refuse it on the CPU
  accelerator: with gloo it trains on CPU processes (tests/test_fsdp2_lightning.py). Pre-training
  only: the compress job's module has no `configure_model` hook, and Lightning's ModelParallelStrategy
  refuses a module without one ("... you are required to override the `configure_model()` hook").

Activation checkpointing wraps the same blocks (FSDP through its own policy, the others with
torch's non-reentrant checkpoint wrapper, which keeps state_dict keys unchanged), and
`trainer.compile` compiles each block in place (no `_orig_mod.` in the keys either). Every strategy
writes checkpoints atomically (aimv2.engine.checkpointing). Lightning refuses FSDP and DeepSpeed
on the CPU accelerator; Lightning's ModelParallelStrategy (`fsdp2`) has no such check (lightning 2.6.6,
pytorch/strategies/model_parallel.py) and torch 2.14's `fully_shard` takes a CPU device mesh with gloo:
on CPU machines `auto`, `ddp` and `fsdp2` run.
"""

from __future__ import annotations

import inspect
import logging
import shutil
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    Strategy,
)
from timm.models.vision_transformer import Block
from torch import nn

from aimv2.checkpoints.dcp import save_dcp_checkpoint
from aimv2.config import TrainerConfig
from aimv2.engine.checkpointing import (
    AtomicCheckpointIO,
    LastCheckpointAtEnd,
    PreemptionCheckpoint,
    remove_checkpoint,
    under_slurm,
)
from aimv2.engine.logs import ResumableCSVLogger, TrimMetricsOnResume, progress_callbacks
from aimv2.engine.optim import quiet_deepspeed_clipping_warning
from aimv2.engine.run_dir import STEP_TEMPLATE, RunDir
from aimv2.engine.stream_resume import SampleLog, StreamPosition
from aimv2.fileio import publish_directory


def fault_tolerance_callbacks(cfg: TrainerConfig, run: RunDir) -> list[Callback]:
    """Data position in checkpoints, checkpoint-and-requeue on signals, the optional sample log."""
    callbacks = [
        StreamPosition(),
        PreemptionCheckpoint(run.checkpoints, slurm=under_slurm()),
        LastCheckpointAtEnd(run.checkpoints),
    ]
    return callbacks + ([SampleLog(run.samples)] if cfg.log_samples else [])


def cluster_plugins() -> list:
    """Under SLURM: Lightning's SLURM environment without its in-signal-handler requeue (ours is
    aimv2.engine.checkpointing, which saves at a step boundary)."""
    if not under_slurm():
        return []
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)]


def build_trainer(
    cfg: TrainerConfig,
    run: RunDir,
    grad_clip: float = 0.0,
    extra_callbacks: Sequence[Callback] = (),
    batch_size: int | None = None,
) -> L.Trainer:
    loggers = [
        # Every logged row reaches the file at once (not every 100 steps): after a kill -9 the file is
        # as new as the newest checkpoint (whose own step's row the checkpoint carries: csv_log).
        ResumableCSVLogger(save_dir=run.metrics.parent, name="", version="", flush_logs_every_n_steps=1),
        TensorBoardLogger(save_dir=run.tensorboard, name="", version="", default_hp_metric=False),
    ]
    checkpoints = ModelCheckpoint(
        dirpath=run.checkpoints,
        filename=STEP_TEMPLATE,
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint_every_n_steps,
        monitor="step",  # the newest `keep_checkpoints` steps are the "top k"
        mode="max",
        save_top_k=cfg.keep_checkpoints,
        save_last=True,
        enable_version_counter=False,  # last.ckpt is replaced, never joined by last-v1.ckpt
    )
    return L.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=build_strategy(cfg, batch_size),
        plugins=[*strategy_plugins(cfg), *cluster_plugins()] or None,
        precision=None if precision_plugin(cfg) else cfg.precision,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        max_steps=cfg.max_steps,
        max_epochs=cfg.max_epochs if cfg.max_epochs is not None else (-1 if cfg.max_steps > 0 else None),
        gradient_clip_val=grad_clip or None,
        # A run shorter than the logging interval still logs (metrics.csv exists for `aimv2 report`).
        log_every_n_steps=min(cfg.log_every_n_steps, cfg.max_steps) if cfg.max_steps > 0 else cfg.log_every_n_steps,
        logger=loggers,
        callbacks=[
            checkpoints,
            TrimMetricsOnResume(),
            *fault_tolerance_callbacks(cfg, run),
            *progress_callbacks(cfg.progress_bar),
            *extra_callbacks,
        ],
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        default_root_dir=run.root,
    )


log = logging.getLogger(__name__)
BLOCKS = {Block}  # the transformer blocks of both the encoder (timm VisionTransformer) and the decoder


class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
    """ZeRO checkpoints are directories written by every rank; write them under a temporary name and
    rename once all ranks are done, so a killed save never leaves a half-written `step=N.ckpt/`; and
    remove them by renaming first, so a killed removal does not either."""

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
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

    def remove_checkpoint(self, filepath) -> None:
        # Lightning's removal goes through the default TorchCheckpointIO: a recursive delete in place.
        if self.is_global_zero:
            remove_checkpoint(filepath)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process (Lightning's ModelParallelStrategy with a 1-D data-parallel mesh and
    no tensor parallelism), saving DCP directories that appear complete or not at all.

    Lightning's own `save_checkpoint` creates `step=N.ckpt/` first and fills it in place (shards,
    `.metadata`, then `meta.pt`): a job killed meanwhile leaves a directory under the final name. Here
    the same layout is written into `.step=N.ckpt.tmp/` and renamed once every rank is done
    (aimv2.checkpoints.dcp.save_dcp_checkpoint); a leftover temporary is removed at the next start
    (aimv2.engine.checkpointing.remove_stale_temporaries). Pruned checkpoints leave their name in one
    rename before they are deleted (aimv2.engine.checkpointing.remove_checkpoint). Loading stays
    Lightning's: DCP reshards to the current world size."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=True, **kwargs)

    def setup_environment(self) -> None:
        # Lightning's "auto" data-parallel size is the number of nodes (tensor parallelism inside a
        # node); FSDP alone shards over every process.
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint(..., storage_options=...) is not supported")
        path = Path(self.broadcast(str(filepath)))
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        save_dcp_checkpoint(state, checkpoint, path, self.global_rank, lambda: self.barrier("aimv2_dcp"))

    def remove_checkpoint(self, filepath) -> None:
        # Lightning's removal goes through the default TorchCheckpointIO: a recursive delete in place.
        if self.is_global_zero:
            remove_checkpoint(filepath)


def shard_model(model: nn.Module, mesh) -> nn.Module:
    """FSDP2 from outside the model code: `fully_shard` each transformer block (timm `Block`, encoder
    and decoder; inside an activation-checkpoint wrapper if there is one), then `model` itself, which
    groups the rest (embeddings, norms, heads). Already-sharded models are left as they are (Lightning
    may call configure_model again, e.g. for validation after fit)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return model
    for block in [m for m in model.modules() if isinstance(m, tuple(BLOCKS))]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def configure_sharding(module, model: nn.Module) -> None:
    """The LightningModule's `configure_model` hook: shard `model` when the trainer's strategy is FSDP2;
    under every other strategy (or without a trainer) nothing happens."""
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and isinstance(trainer.strategy, FSDP2Strategy):
        shard_model(model, trainer.strategy.device_mesh["data_parallel"])


def ddp_buffer_sync() -> dict[str, bool]:
    """DistributedDataParallel's keyword that turns off the buffer broadcast at every forward: the model
    has no running statistics, and the data counters kept in buffers (skipped samples, shard errors) are
    per-rank totals summed when logged, which a broadcast from rank 0 would overwrite.

    torch >= 2.13 names it `forward_sync_buffers` and warns about the old `broadcast_buffers`. The new
    one still broadcasts rank 0's buffers once when DDP wraps the model, which is harmless here: every
    rank holds the same buffers then (zeros, or the one checkpoint's values, which Lightning restores
    before the wrap). Older torch has only `broadcast_buffers`."""
    new = "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers" if new else "broadcast_buffers": False}


def build_strategy(cfg: TrainerConfig, batch_size: int | None = None) -> Strategy | str:
    """The Lightning strategy for `cfg.strategy` (validated by TrainerConfig.validate)."""
    if cfg.strategy == "ddp":
        return DDPStrategy(**ddp_buffer_sync(), gradient_as_bucket_view=True, checkpoint_io=AtomicCheckpointIO())
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
        quiet_deepspeed_clipping_warning()  # DeepSpeed's engine clips (aimv2.engine.optim)
        return AtomicDeepSpeedStrategy(
            stage=cfg.zero_stage,
            offload_optimizer=cfg.offload,
            offload_parameters=cfg.offload and cfg.zero_stage == 3,
            pin_memory=cfg.offload,
            logging_batch_size_per_gpu=batch_size or 1,
        )
    if cfg.strategy == "fsdp2":
        return FSDP2Strategy()
    return "auto"


def strategy_plugins(cfg: TrainerConfig) -> list:
    """Plugins for `Trainer(plugins=...)`: atomic checkpoint writes when Lightning picks the strategy,
    and the mixed-precision plugin (`precision_plugin`)."""
    return ([AtomicCheckpointIO()] if cfg.strategy == "auto" else []) + (
        [precision] if (precision := precision_plugin(cfg)) else []
    )


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
            model,
            checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda m: isinstance(m, tuple(BLOCKS)),
        )
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
