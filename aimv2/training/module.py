"""The pre-training LightningModule: prefix lengths, forward, the AIMv2 loss, logging, optimizer."""

from __future__ import annotations

import time
from dataclasses import asdict

import lightning as L
import torch

from aimv2.config import ModelConfig, ObjectiveConfig, OptimConfig
from aimv2.models import AIMv2, get_size
from aimv2.models.masks import sample_prefix_lengths
from aimv2.objective import aimv2_loss
from aimv2.training.optim import build_optimizer, warmup_cosine


def _as(cls, value):
    return value if isinstance(value, cls) else cls(**value)


class AIMv2PretrainModule(L.LightningModule):
    def __init__(self, model: ModelConfig | dict, objective: ObjectiveConfig | dict, optim: OptimConfig | dict,
                 vocab_size: int, max_text_len: int):
        super().__init__()
        model, objective, optim = _as(ModelConfig, model), _as(ObjectiveConfig, objective), _as(OptimConfig, optim)
        # Plain dicts in the checkpoint: it reloads with weights_only=True and without this package's classes.
        self.save_hyperparameters({"model": asdict(model), "objective": asdict(objective), "optim": asdict(optim),
                                   "vocab_size": vocab_size, "max_text_len": max_text_len})
        self.objective, self.optim_cfg = objective, optim
        self.spec = get_size(model.size)
        self.model = AIMv2(self.spec, model.img_size, vocab_size, max_text_len)
        # Running totals live in buffers so they are summed across ranks and saved in checkpoints.
        self.register_buffer("skipped_samples", torch.zeros((), dtype=torch.long))
        self.register_buffer("shard_errors", torch.zeros((), dtype=torch.long))
        self._last_step_time: float | None = None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, tokens, token_mask = batch["image"], batch["tokens"], batch["token_mask"]
        prefix = sample_prefix_lengths(images.shape[0], self.model.num_patches, device=images.device)
        pixels, logits = self.model(images, tokens, prefix, token_mask)  # logits (n_real_tokens, V)
        losses = aimv2_loss(pixels, logits, images, tokens, token_mask, prefix, self.spec.patch_size,
                            alpha=self.objective.alpha, text_weight=self.objective.text_weight)
        self.skipped_samples += batch["skipped"]
        self.shard_errors += batch["shard_errors"]
        self.log("train/loss", losses.total, prog_bar=True)
        self.log("train/loss_img", losses.image, prog_bar=True)
        self.log("train/loss_text", losses.text, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self.log("data/skipped_samples", self.skipped_samples.float(), reduce_fx="sum", sync_dist=True)
        self.log("data/shard_errors", self.shard_errors.float(), reduce_fx="sum", sync_dist=True)
        self._log_throughput(images.shape[0])
        return losses.total

    def _log_throughput(self, batch_size: int) -> None:
        # Wall time between consecutive steps on this rank, times the world size: global samples/s.
        now = time.perf_counter()
        if self._last_step_time is not None:
            rate = batch_size * self.trainer.world_size / max(now - self._last_step_time, 1e-9)
            self.log("train/samples_per_sec", rate, prog_bar=True)
        self._last_step_time = now

    def configure_optimizers(self):
        cfg = self.optim_cfg
        optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
        total = int(min(self.trainer.estimated_stepping_batches, 2**62))
        warmup = min(cfg.warmup_steps, max(total - 1, 0))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, cfg.lr, cfg.min_lr) / cfg.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
