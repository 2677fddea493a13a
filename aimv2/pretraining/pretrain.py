"""Run a pre-training job from a resolved `PretrainConfig`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import Callback

from aimv2.config import PretrainConfig, save_config
from aimv2.cpu_tuning import tune_cpu_allocator
from aimv2.engine.checkpoint_io import tidy_before_training
from aimv2.pretraining.datamodule import PretrainDataModule
from aimv2.pretraining.init_from import apply_init_from
from aimv2.engine.launch_checks import check_launch, claim_run_dir
from aimv2.pretraining.module import AIMv2PretrainModule
from aimv2.pretraining.validation import validation_callbacks
from aimv2.engine.preemption import Preempted, PreemptionCheckpoint
from aimv2.engine.resume import resolve_resume
from aimv2.engine.strategy import prepare_model
from aimv2.engine.run_dir import RunDir
from aimv2.engine.trainer import build_trainer
from aimv2.models.sizes import get_size
from aimv2.viz.callback import visualization_callbacks


def pretrain(cfg: PretrainConfig, callbacks: Sequence[Callback] = ()) -> RunDir:
    """Train; returns the run directory (config, checkpoints, metrics, tensorboard). A run continues
    from `trainer.resume` (aimv2.engine.resume); `callbacks` are added to the Trainer's."""
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    run = RunDir(cfg.run_dir)
    resume = resolve_resume(cfg.trainer.resume, run.checkpoints)  # before any work: bad paths fail fast
    check_launch(cfg.trainer)
    claim_run_dir(run, cfg.trainer.resume, cfg.trainer.overwrite)
    data = PretrainDataModule(cfg.data, cfg.model.img_size,
                              native_patch=get_size(cfg.model.size).patch_size if cfg.model.native else None)
    # The held-out set (data.val) is resolved now too: a missing shard fails before any model is built.
    validation = validation_callbacks(cfg.data.val, cfg.model, cfg.data.batch_size, data.tokenizer)
    module = AIMv2PretrainModule(cfg.model, cfg.objective, cfg.optim, vocab_size=data.vocab_size,
                                 max_text_len=cfg.data.tokenizer.max_length,
                                 max_nonfinite_steps=cfg.trainer.max_nonfinite_steps)
    loaded = apply_init_from(module.model, cfg.model, resume)  # before any wrapper renames the parameters
    prepare_model(module.model, cfg.trainer)
    trainer = build_trainer(cfg.trainer, run, grad_clip=cfg.optim.grad_clip, batch_size=cfg.data.batch_size,
                            extra_callbacks=[*visualization_callbacks(cfg.visualize, run, data.tokenizer),
                                             *validation, *callbacks])
    if isinstance(trainer.accelerator, CPUAccelerator):
        tune_cpu_allocator()  # for Python callers; the aimv2 command has already done it (aimv2.cpu_tuning)
    if trainer.is_global_zero:
        save_config(cfg, run.config)
        tidy_before_training(run.checkpoints, cfg.trainer.resume, resume)
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
        return run
    finally:
        for callback in preemption:
            callback.uninstall()
    if trainer.is_global_zero:
        print(summary(run, trainer.global_step))
    return run


def summary(run: RunDir, steps: int) -> str:
    return "\n".join([
        f"pre-training finished after {steps} steps",
        f"  config       {run.config}",
        f"  checkpoints  {run.checkpoints}/ (last.ckpt is the newest)",
        f"  metrics      {run.metrics}",
        f"  tensorboard  tensorboard --logdir {run.tensorboard}",
        *([f"  predictions  {run.visualizations}/step=*.png (next-patch grids)"]
          if any(run.visualizations.glob("step=*.png")) else []),
        f"  report       aimv2 report {run}",
    ])
