"""Run a pre-training job from a resolved `PretrainConfig`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import Callback

from aimv2.config import PretrainConfig, save_config
from aimv2.cpu_tuning import tune_cpu_allocator
from aimv2.engine.checkpoint_io import remove_stale_temporaries
from aimv2.pretraining.datamodule import PretrainDataModule
from aimv2.pretraining.init_from import apply_init_from
from aimv2.engine.launch_checks import check_launch, claim_run_dir
from aimv2.pretraining.module import AIMv2PretrainModule
from aimv2.engine.preemption import Preempted, PreemptionCheckpoint
from aimv2.engine.resume import resolve_resume
from aimv2.engine.strategy import prepare_model
from aimv2.engine.trainer import build_trainer, run_paths
from aimv2.viz.callback import visualization_callbacks


def pretrain(cfg: PretrainConfig, callbacks: Sequence[Callback] = ()) -> dict[str, Path]:
    """Train; returns the run's paths (config, checkpoints, metrics, tensorboard). A run continues
    from `trainer.resume` (aimv2.engine.resume); `callbacks` are added to the Trainer's."""
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    paths = run_paths(cfg.run_dir)
    resume = resolve_resume(cfg.trainer.resume, paths["checkpoints"])  # before any work: bad paths fail fast
    check_launch(cfg.trainer)
    claim_run_dir(cfg.run_dir, cfg.trainer.resume, cfg.trainer.overwrite)
    data = PretrainDataModule(cfg.data, cfg.model.img_size)
    module = AIMv2PretrainModule(cfg.model, cfg.objective, cfg.optim, vocab_size=data.vocab_size,
                                 max_text_len=cfg.data.tokenizer.max_length,
                                 max_nonfinite_steps=cfg.trainer.max_nonfinite_steps)
    loaded = apply_init_from(module.model, cfg.model, resume)  # before any wrapper renames the parameters
    prepare_model(module.model, cfg.trainer)
    trainer = build_trainer(cfg.trainer, cfg.run_dir, grad_clip=cfg.optim.grad_clip, batch_size=cfg.data.batch_size,
                            extra_callbacks=[*visualization_callbacks(cfg.visualize, cfg.run_dir, data.tokenizer),
                                             *callbacks])
    if isinstance(trainer.accelerator, CPUAccelerator):
        tune_cpu_allocator()  # for Python callers; the aimv2 command has already done it (aimv2.cpu_tuning)
    if trainer.is_global_zero:
        save_config(cfg, paths["config"])
        for name in remove_stale_temporaries(paths["checkpoints"]):
            print(f"removed the remains of an interrupted checkpoint save: {paths['checkpoints'] / name}")
        if resume is not None:
            print(f"resuming from {resume}", flush=True)
        for line in loaded:  # what model.init_from loaded, or why it was ignored
            print(line, flush=True)
    preemption = [cb for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint)]
    for callback in preemption:
        callback.install()  # a signal during start-up must not kill the job before training begins
    try:
        with warnings.catch_warnings():
            # Lightning cannot see that our data module restores the stream position (aimv2.data.loader).
            warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
            trainer.fit(module, datamodule=data, ckpt_path=resume)
    except Preempted as stop:
        if trainer.is_global_zero:
            print(f"{stop}; " + ("the SLURM job was requeued and will continue from it" if stop.requeued
                                 else "continue with trainer.resume=auto"), flush=True)
        return paths
    finally:
        for callback in preemption:
            callback.uninstall()
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
        *([f"  predictions  {paths['visualizations']}/step=*.png (next-patch grids)"]
          if any(paths["visualizations"].glob("step=*.png")) else []),
        f"  report       aimv2 report {paths['config'].parent}",
    ])
