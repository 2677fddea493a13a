"""Build the Lightning Trainer of a run: loggers, checkpoints and limits from `TrainerConfig`.

Run directory layout:
    RUN/config.yaml              the resolved config
    RUN/checkpoints/*.ckpt       every N steps, plus last.ckpt
    RUN/logs/metrics.csv         every logged metric (CSV)
    RUN/logs/tensorboard/        the same for TensorBoard
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from aimv2.config import TrainerConfig
from aimv2.training.csv_log import ResumableCSVLogger, TrimMetricsOnResume


def run_paths(run_dir: str | Path) -> dict[str, Path]:
    run_dir = Path(run_dir)
    return {
        "config": run_dir / "config.yaml",
        "checkpoints": run_dir / "checkpoints",
        "metrics": run_dir / "logs" / "metrics.csv",
        "tensorboard": run_dir / "logs" / "tensorboard",
    }


def build_trainer(cfg: TrainerConfig, run_dir: str | Path, grad_clip: float = 0.0) -> L.Trainer:
    paths = run_paths(run_dir)
    loggers = [
        ResumableCSVLogger(save_dir=paths["metrics"].parent, name="", version=""),
        TensorBoardLogger(save_dir=paths["tensorboard"], name="", version="", default_hp_metric=False),
    ]
    checkpoints = ModelCheckpoint(
        dirpath=paths["checkpoints"],
        filename="step={step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint_every_n_steps,
        save_top_k=-1,
        save_last=True,
    )
    return L.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=cfg.precision,
        max_steps=cfg.max_steps,
        max_epochs=cfg.max_epochs if cfg.max_epochs is not None else (-1 if cfg.max_steps > 0 else None),
        gradient_clip_val=grad_clip or None,
        log_every_n_steps=cfg.log_every_n_steps,
        logger=loggers,
        callbacks=[checkpoints, TrimMetricsOnResume()],
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
