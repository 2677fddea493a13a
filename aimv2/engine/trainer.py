"""Build the Lightning Trainer of a run: loggers, checkpoints and limits from `TrainerConfig`.

Run directory layout:
    RUN/config.yaml              the resolved config
    RUN/checkpoints/*.ckpt       every N steps (the newest `keep_checkpoints`), plus last.ckpt; written
                                 atomically (aimv2.engine.checkpoint_io)
    RUN/logs/samples/rank*.tsv   with trainer.log_samples: the keys of every consumed sample
    RUN/logs/metrics.csv         every logged metric (CSV)
    RUN/logs/tensorboard/        the same for TensorBoard
    RUN/visualizations/          next-patch prediction grids (aimv2.viz.callback)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from aimv2.config import TrainerConfig
from aimv2.engine.csv_log import ResumableCSVLogger, TrimMetricsOnResume
from aimv2.engine.preemption import LastCheckpointAtEnd, PreemptionCheckpoint
from aimv2.engine.progress_bar import progress_callbacks
from aimv2.engine.resume import under_slurm
from aimv2.engine.strategy import build_strategy, precision_plugin, strategy_plugins
from aimv2.engine.stream_state import SampleLog, StreamPosition


def run_paths(run_dir: str | Path) -> dict[str, Path]:
    run_dir = Path(run_dir)
    return {
        "config": run_dir / "config.yaml",
        "checkpoints": run_dir / "checkpoints",
        "metrics": run_dir / "logs" / "metrics.csv",
        "tensorboard": run_dir / "logs" / "tensorboard",
        "visualizations": run_dir / "visualizations",
        "samples": run_dir / "logs" / "samples",
    }


def fault_tolerance_callbacks(cfg: TrainerConfig, paths: dict[str, Path]) -> list[Callback]:
    """Data position in checkpoints, checkpoint-and-requeue on signals, the optional sample log."""
    callbacks = [StreamPosition(), PreemptionCheckpoint(paths["checkpoints"], slurm=under_slurm()),
                 LastCheckpointAtEnd(paths["checkpoints"])]
    return callbacks + ([SampleLog(paths["samples"])] if cfg.log_samples else [])


def cluster_plugins() -> list:
    """Under SLURM: Lightning's SLURM environment without its in-signal-handler requeue (ours is
    aimv2.engine.preemption, which saves at a step boundary)."""
    if not under_slurm():
        return []
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)]


def build_trainer(cfg: TrainerConfig, run_dir: str | Path, grad_clip: float = 0.0,
                  extra_callbacks: Sequence[Callback] = (), batch_size: int | None = None) -> L.Trainer:
    paths = run_paths(run_dir)
    loggers = [
        # Every logged row reaches the file at once (not every 100 steps): after a kill -9 the file is
        # as new as the newest checkpoint, less at most the row of the step that checkpoint ended.
        ResumableCSVLogger(save_dir=paths["metrics"].parent, name="", version="", flush_logs_every_n_steps=1),
        TensorBoardLogger(save_dir=paths["tensorboard"], name="", version="", default_hp_metric=False),
    ]
    checkpoints = ModelCheckpoint(
        dirpath=paths["checkpoints"],
        filename="step={step:07d}",
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
        callbacks=[checkpoints, TrimMetricsOnResume(), *fault_tolerance_callbacks(cfg, paths),
                   *progress_callbacks(cfg.progress_bar), *extra_callbacks],
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
