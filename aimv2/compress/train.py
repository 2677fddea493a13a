"""`aimv2 compress train`: alignment of a compressor between a frozen encoder and an LLM, as a
Lightning run in the engine's run directory layout (aimv2.engine.run_dir) built by the same
`build_trainer` as pre-training."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from aimv2.checkpoints import schema
from aimv2.compress.config import CompressConfig
from aimv2.compress.module import AlignmentDataModule, CompressModule
from aimv2.config import save_config
from aimv2.engine.checkpointing import fit_until_signal, resolve_resume, tidy_before_training
from aimv2.engine.launch_checks import check_launch, claim_run_dir
from aimv2.engine.logs import read_metric
from aimv2.engine.run_dir import RunDir
from aimv2.engine.trainer import build_trainer
from aimv2.errors import UserError


def resolve_paths(cfg: CompressConfig) -> CompressConfig:
    """Absolute encoder/LM paths, so checkpoints reload from any working directory."""
    for section, key in ((cfg.encoder, "source"), (cfg.lm, "path")):
        value = getattr(section, key)
        if value and Path(value).exists():
            setattr(section, key, str(Path(value).resolve()))
    return cfg


def train(cfg: CompressConfig, callbacks: Sequence[Callback] = ()) -> RunDir:
    """Train; returns the run directory (config, checkpoints, metrics, tensorboard). `callbacks` join the
    trainer's own; a preemption signal ends it as in `aimv2.pretraining.pretrain.pretrain`."""
    cfg.require("encoder.source", "data.train")
    if cfg.trainer.max_steps <= 0:
        raise UserError("config key 'trainer.max_steps': must be > 0 (the training stream is infinite)")
    cfg = resolve_paths(cfg)
    # A path, `auto` (newest intact checkpoint; the default under SLURM, so a requeued job resumes) or `none`.
    run = RunDir(cfg.run_dir)
    resume = resolve_resume(cfg.trainer.resume, run.checkpoints)
    check_launch(cfg.trainer)
    claim_run_dir(run, cfg.trainer.resume, cfg.trainer.overwrite)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    module = build_module(cfg)
    if cfg.compressor.init and resume is None:
        init_compressor(module, cfg.compressor.init)
    data = AlignmentDataModule(cfg.data, module.tokenizer, module.vlm.preprocessing)
    trainer = build_trainer(cfg.trainer, run, grad_clip=cfg.optim.grad_clip, extra_callbacks=callbacks)
    if trainer.is_global_zero:
        save_config(cfg, run.config)
        tidy_before_training(run.checkpoints, cfg.trainer.resume, resume)
    with warnings.catch_warnings():  # expected here: frozen parts in eval mode, frozen weights not in checkpoints
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
        warnings.filterwarnings("ignore", message=".*in the model state dict but not in the checkpoint.*")
        # Lightning cannot see that the data module restores the stream position (aimv2.engine.stream_resume).
        warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
        fit_until_signal(trainer, lambda: trainer.fit(module, datamodule=data, ckpt_path=resume))
    if trainer.is_global_zero:
        print(summary(cfg, run, trainer.global_step))
    return run


def build_module(cfg: CompressConfig) -> CompressModule:
    """The alignment module of a config: it receives the sections it needs, not the whole tree."""
    return CompressModule(cfg.stage, cfg.encoder, cfg.compressor, cfg.lm, cfg.text, cfg.optim, seed=cfg.trainer.seed)


def init_compressor(module: CompressModule, source: str) -> None:
    """Copy the compressor weights of an earlier run (checkpoint, run dir) or an exported bundle."""
    import torch
    from safetensors.torch import load_file

    from aimv2.compress.evaluate import resolve_checkpoint

    key = "compressor.init"
    if (Path(source) / "compressor.safetensors").is_file():
        state = load_file(Path(source) / "compressor.safetensors")
    else:
        raw = torch.load(resolve_checkpoint(source), map_location="cpu", weights_only=True)
        state = {
            k.removeprefix("vlm.compressor."): v
            for k, v in schema.model_state(raw).items()
            if k.startswith("vlm.compressor.")
        }
    try:
        module.vlm.compressor.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(
            f"config key '{key}': {source} holds another compressor: {str(err).splitlines()[0][:200]}"
        ) from None
    print(f"compressor initialized from {source}")


def loss_trend(metrics_csv: Path, window: int = 3) -> str:
    values = [v for _, v in read_metric(metrics_csv, "train/caption_loss")] if metrics_csv.is_file() else []
    if not values:
        return "no caption loss logged (raise trainer.max_steps or lower trainer.log_every_n_steps)"
    first, last = values[:window], values[-window:]
    before, after = sum(first) / len(first), sum(last) / len(last)
    return f"caption loss {before:.3f} -> {after:.3f} (mean of the first/last {window} logged)"


def summary(cfg: CompressConfig, run: RunDir, steps: int) -> str:
    c = cfg.compressor
    return "\n".join(
        [
            f"alignment (stage {cfg.stage}, compressor {c.kind}, M={c.num_tokens or 'N'}) finished after {steps} steps",
            f"  {loss_trend(run.metrics)}",
            f"  config       {run.config}",
            f"  checkpoints  {run.checkpoints}/ (last.ckpt is the newest)",
            f"  metrics      {run.metrics}",
            f"  tensorboard  tensorboard --logdir {run.tensorboard}",
        ]
    )
