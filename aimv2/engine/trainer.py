"""Build the Lightning Trainer of a run: loggers, checkpoints and limits from `TrainerConfig`, in the
run directory layout of aimv2.engine.run_dir (checkpoints written atomically: aimv2.engine.checkpointing).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from aimv2.config import TrainerConfig
from aimv2.engine.checkpointing import LastCheckpointAtEnd, PreemptionCheckpoint, under_slurm
from aimv2.engine.logs import ResumableCSVLogger, TrimMetricsOnResume, progress_callbacks
from aimv2.engine.run_dir import STEP_TEMPLATE, RunDir
from aimv2.engine.strategy import build_strategy, precision_plugin, strategy_plugins
from aimv2.engine.stream_resume import SampleLog, StreamPosition


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
