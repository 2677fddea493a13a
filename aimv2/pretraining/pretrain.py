"""A pre-training run: its data module and `pretrain(cfg)`.

The pre-training LightningDataModule: image-caption batches streamed from shard sources, resumable
at any batch (aimv2.engine.stream_resume).

Run a pre-training job from a resolved `PretrainConfig`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import Callback

from aimv2.config import DataConfig, PretrainConfig, save_config
from aimv2.data.native import NativeImageCaptionProcessor, NativeResizeFlip, PackedCollator, Packing
from aimv2.data.samples import (
    ImageCaptionCollator,
    ImageCaptionProcessor,
    decode_image_tensor,
    normalize_images,
    normalize_patch_pixels,
    pretrain_transform,
)
from aimv2.data.shardlist import check_first_shard, resolve_shards
from aimv2.data.stream import ShardStream, StreamSource
from aimv2.data.tokenizer import build_tokenizer
from aimv2.engine.checkpointing import fit_until_signal, resolve_resume, tidy_before_training
from aimv2.engine.launch_checks import check_launch, claim_run_dir
from aimv2.engine.run_dir import RunDir
from aimv2.engine.stream_resume import StreamDataModule
from aimv2.engine.trainer import build_trainer, prepare_model
from aimv2.errors import UserError
from aimv2.models.sizes import get_size
from aimv2.pretraining.init_from import apply_init_from
from aimv2.pretraining.module import AIMv2PretrainModule
from aimv2.pretraining.validation import validation_callbacks
from aimv2.processes import tune_cpu_allocator
from aimv2.viz.callback import visualization_callbacks


class PretrainDataModule(StreamDataModule):
    """Exact resume of the stream comes from `StreamDataModule` (aimv2.engine.stream_resume)."""

    def __init__(self, cfg: DataConfig, img_size: int, native_patch: int | None = None):
        """`native_patch`: the patch size of a native-resolution model (model.native): batches are then
        packed rows of images at their own aspect ratio (cfg.native), not crops of img_size."""
        super().__init__(cfg.num_workers, cfg.on_change)
        self.cfg, self.img_size, self.native_patch = cfg, img_size, native_patch
        self.tokenizer = build_tokenizer(cfg.tokenizer)
        # A mistyped shard directory is reported now, before any model is built (one file operation per
        # source); the sources are resolved once the processes exist, by one of them (setup).
        for i, src in enumerate(cfg.sources):
            check_first_shard(src.urls, f"data.sources.{i}.urls")

    def resolve_sources(self) -> list[StreamSource]:
        cfg = self.cfg
        return [
            StreamSource(
                src.name or f"source{i}",
                resolve_shards(src.urls, f"data.sources.{i}.urls", need_counts=cfg.mode == "epoch"),
                src.weight,
            )
            for i, src in enumerate(cfg.sources)
        ]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def build_stream(self, rank: int = 0, world_size: int = 1) -> ShardStream:
        cfg = self.cfg
        if self.native_patch is not None:
            n = cfg.native
            packing = Packing(
                self.native_patch,
                n.min_patches,
                n.max_patches,
                n.row_tokens,
                n.rows,
                n.window,
                tuple(cfg.crop_scale),
                tuple(cfg.crop_ratio),
            )
            process = NativeImageCaptionProcessor(NativeResizeFlip(self.native_patch, cfg.hflip), decode_image_tensor)
            collate = PackedCollator(self.tokenizer, self.native_patch, n.row_tokens)
        else:
            packing = None
            process = ImageCaptionProcessor(
                pretrain_transform(self.img_size, cfg.crop_scale, cfg.crop_ratio, cfg.hflip), decode=decode_image_tensor
            )
            collate = ImageCaptionCollator(self.tokenizer)
        try:
            return ShardStream(
                self.resolved_sources(),
                process=process,
                collate=collate,
                batch_size=cfg.batch_size,
                mode=cfg.mode,
                rank=rank,
                world_size=world_size,
                num_workers=cfg.num_workers,
                seed=cfg.seed,
                shuffle_buffer=cfg.shuffle_buffer,
                packing=packing,
            )
        except ValueError as err:
            raise UserError(f"data: {err}") from None

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """uint8 images from the workers become normalized floats here, on the training device."""
        if "patches" in batch:  # packed native-resolution rows
            batch["patches"] = normalize_patch_pixels(batch["patches"])
        else:
            batch["image"] = normalize_images(batch["image"])
        return batch


def pretrain(cfg: PretrainConfig, callbacks: Sequence[Callback] = ()) -> RunDir:
    """Train; returns the run directory (config, checkpoints, metrics, tensorboard). A run continues
    from `trainer.resume` (aimv2.engine.checkpointing); `callbacks` are added to the Trainer's. A
    preemption signal ends it with `Preempted` (a SystemExit with status 0) once `last.ckpt` is saved."""
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    run = RunDir(cfg.run_dir)
    resume = resolve_resume(cfg.trainer.resume, run.checkpoints)  # before any work: bad paths fail fast
    check_launch(cfg.trainer)
    claim_run_dir(run, cfg.trainer.resume, cfg.trainer.overwrite)
    data = PretrainDataModule(
        cfg.data, cfg.model.img_size, native_patch=get_size(cfg.model.size).patch_size if cfg.model.native else None
    )
    # The held-out set (data.val) is resolved now too: a missing shard fails before any model is built.
    validation = validation_callbacks(cfg.data.val, cfg.model, cfg.data.batch_size, data.tokenizer)
    module = AIMv2PretrainModule(
        cfg.model,
        cfg.objective,
        cfg.optim,
        vocab_size=data.vocab_size,
        max_text_len=cfg.data.tokenizer.max_length,
        max_nonfinite_steps=cfg.trainer.max_nonfinite_steps,
    )
    loaded = apply_init_from(module.model, cfg.model, resume)  # before any wrapper renames the parameters
    prepare_model(module.model, cfg.trainer)
    trainer = build_trainer(
        cfg.trainer,
        run,
        grad_clip=cfg.optim.grad_clip,
        batch_size=cfg.data.batch_size,
        extra_callbacks=[*visualization_callbacks(cfg.visualize, run, data.tokenizer), *validation, *callbacks],
    )
    if isinstance(trainer.accelerator, CPUAccelerator):
        tune_cpu_allocator()  # for Python callers; the aimv2 command has already done it (aimv2.processes)
    if trainer.is_global_zero:
        save_config(cfg, run.config)
        tidy_before_training(run.checkpoints, cfg.trainer.resume, resume)
        if resume is not None:
            print(f"resuming from {resume}", flush=True)
        for line in loaded:  # what model.init_from loaded, or why it was ignored
            print(line, flush=True)
    with warnings.catch_warnings():
        # Lightning cannot see that our data module restores the stream position (aimv2.data.loader).
        warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
        fit_until_signal(trainer, lambda: trainer.fit(module, datamodule=data, ckpt_path=resume))
    if trainer.is_global_zero:
        print(summary(run, trainer.global_step))
    return run


def summary(run: RunDir, steps: int) -> str:
    return "\n".join(
        [
            f"pre-training finished after {steps} steps",
            f"  config       {run.config}",
            f"  checkpoints  {run.checkpoints}/ (last.ckpt is the newest)",
            f"  metrics      {run.metrics}",
            f"  tensorboard  tensorboard --logdir {run.tensorboard}",
            *(
                [f"  predictions  {run.visualizations}/step=*.png (next-patch grids)"]
                if any(run.visualizations.glob("step=*.png"))
                else []
            ),
            f"  report       aimv2 report {run}",
        ]
    )
