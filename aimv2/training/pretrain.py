"""Run a pre-training job from a resolved `PretrainConfig`."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from aimv2.config import PretrainConfig, save_config
from aimv2.errors import UserError
from aimv2.training.datamodule import PretrainDataModule
from aimv2.training.module import AIMv2PretrainModule
from aimv2.training.trainer import build_trainer, run_paths


def pretrain(cfg: PretrainConfig) -> dict[str, Path]:
    """Train; returns the run's paths (config, checkpoints, metrics, tensorboard)."""
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    data = PretrainDataModule(cfg.data, cfg.model.img_size)
    module = AIMv2PretrainModule(cfg.model, cfg.objective, cfg.optim,
                                 vocab_size=data.vocab_size, max_text_len=cfg.data.tokenizer.max_length)
    trainer = build_trainer(cfg.trainer, cfg.run_dir, grad_clip=cfg.optim.grad_clip)
    paths = run_paths(cfg.run_dir)
    if trainer.is_global_zero:
        save_config(cfg, paths["config"])
    resume = cfg.trainer.resume
    if resume is not None and not Path(resume).exists():
        raise UserError(f"trainer.resume: checkpoint not found: {resume}")
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    if trainer.is_global_zero:
        print(summary(paths, trainer.global_step))
    return paths


def summary(paths: dict[str, Path], steps: int) -> str:
    return "\n".join([
        f"pre-training finished after {steps} steps",
        f"  config       {paths['config']}",
        f"  checkpoints  {paths['checkpoints']}/ (last.ckpt is the newest)",
        f"  metrics      {paths['metrics']}",
        f"  tensorboard  tensorboard --logdir {paths['tensorboard']}",
    ])
