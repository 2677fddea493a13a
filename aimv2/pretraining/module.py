"""The pre-training LightningModule: prefix lengths, forward, the AIMv2 loss, logging, optimizer, and
the guard that keeps NaN/inf out of the weights.

Non-finite steps. A loss or gradient that is NaN/inf must not reach the optimizer (one such update
ruins every weight it touches). Before each optimizer step the ranks agree whether any of them saw a
non-finite loss or gradient norm; if so the step is skipped: with fused AdamW (the default) the
decision stays on the device as the optimizer's `found_inf` flag, so the step needs no host sync;
otherwise the gradients are dropped (set to None, so AdamW leaves weights and moments alone). The
step still counts (global step, LR schedule, the data position) and `train/nonfinite_steps` counts
it (on a GPU the host reads the flag one step late). After `max_nonfinite_steps` skipped steps in a
row the run stops with an error naming the step. Under DeepSpeed its ZeRO optimizer detects the
overflow and skips the step itself; we count it. A checkpoint is never written from non-finite
weights.

One gradient for the global batch. Ranks draw different numbers of targets (random prefix lengths,
caption lengths, native batches of any number of images and tokens, epoch batches shortened by skipped
samples), so each rank's loss is normalized by the GLOBAL counts (aimv2.objective.global_losses: one
all-reduce of the detached sums and counts per training_step): the data-parallel average of the gradients is the
gradient of the global batch's mean loss, and train/loss, train/loss_img, train/loss_text are the global
batch's means, the same on every rank. On one process it is the batch's mean loss, with no collective.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict

import lightning as L
import torch

from aimv2.checkpoints import schema
from aimv2.config import ModelConfig, ObjectiveConfig, OptimConfig, as_section
from aimv2.engine.logs import RankCounters
from aimv2.engine.optim import (
    ClipGradientNorm,
    build_optimizer,
    no_decay_names,
    optimizer_options,
    warmup_cosine_schedule,
)
from aimv2.errors import UserError
from aimv2.models import AIMv2, get_size
from aimv2.models.encoder import attention_backend
from aimv2.models.masks import sample_prefix_lengths, sample_prefix_lengths_per_image
from aimv2.objective import Losses, LossSums, aimv2_loss_sums, global_losses, packed_aimv2_loss_sums

log = logging.getLogger(__name__)


def skips_on_device(optimizer) -> bool:
    """Fused torch Adam/AdamW honours `found_inf`: it can skip a step without the host deciding."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


class NonFiniteTraining(UserError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient."""


class AIMv2PretrainModule(ClipGradientNorm, L.LightningModule):
    def __init__(
        self,
        model: ModelConfig | dict,
        objective: ObjectiveConfig | dict,
        optim: OptimConfig | dict,
        vocab_size: int,
        max_text_len: int,
        max_nonfinite_steps: int = 10,
    ):
        super().__init__()
        model, objective, optim = (
            as_section(ModelConfig, model),
            as_section(ObjectiveConfig, objective),
            as_section(OptimConfig, optim),
        )
        # Plain dicts in the checkpoint: it reloads with weights_only=True and without this package's classes.
        self.save_hyperparameters(
            {
                "model": asdict(model),
                "objective": asdict(objective),
                "optim": asdict(optim),
                "vocab_size": vocab_size,
                "max_text_len": max_text_len,
            }
        )
        self.objective, self.optim_cfg = objective, optim
        self.max_nonfinite_steps = max_nonfinite_steps
        self.spec = get_size(model.size)
        self.model = AIMv2(self.spec, model.img_size, vocab_size, max_text_len, native=model.native)
        self.attention = model.attention  # packed rows: resolved per device (aimv2.models.encoder)
        self._no_decay = no_decay_names(self.model)  # before any wrapper flattens the parameters
        # Running totals live in buffers so they are summed across ranks and saved in checkpoints.
        self.rank_counters = RankCounters("skipped_samples", "shard_errors")
        self._last_step_time: float | None = None
        self._last_batch_end: float | None = None
        self._loss_finite: torch.Tensor | None = None  # all losses since the last optimizer step finite
        self.nonfinite_total, self._nonfinite_in_a_row = 0, 0
        self._pending: list[tuple[torch.Tensor, torch.cuda.Event]] = []  # GPU skip flags on their way to the host
        self._steps_counted = 0

    def configure_model(self) -> None:
        """Lightning's hook for sharding applied from outside: FSDP2 under the fsdp2 strategy
        (aimv2.engine.trainer.configure_sharding); nothing under the others."""
        from aimv2.engine.trainer import configure_sharding

        configure_sharding(self, self.model)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Prefix lengths from the batch's own seed (set by the stream): the same after a resume.
        generator = torch.Generator().manual_seed(int(batch["seed"])) if "seed" in batch else None
        if "patches" in batch:
            sums, num_images = self._packed_loss_sums(batch, generator)
        else:
            sums, num_images = self._loss_sums(batch, generator)
        loss, losses = global_losses(sums, self.objective.alpha, self.objective.text_weight, self.trainer.world_size)
        finite = torch.isfinite(loss.detach())  # the value backward sees
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self.log("train/loss", losses.total, prog_bar=True)
        self.log("train/loss_img", losses.image, prog_bar=True)
        self.log("train/loss_text", losses.text, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        skipped = self.rank_counters.add("skipped_samples", batch["skipped"])
        shard_errors = self.rank_counters.add("shard_errors", batch["shard_errors"])
        self.log("data/skipped_samples", skipped.float(), reduce_fx="sum", sync_dist=True)
        self.log("data/shard_errors", shard_errors.float(), reduce_fx="sum", sync_dist=True)
        self._log_throughput(num_images)
        return loss

    def _losses(self, batch: dict, generator, prefix: torch.Tensor | None = None) -> tuple[Losses, int]:
        """This batch's mean losses and its number of images (the held-out loss weighs them by its own counts:
        aimv2.pretraining.validation). `prefix` (B,): given prefix lengths instead of drawn ones."""
        sums, num_images = self._loss_sums(batch, generator, prefix)
        return sums.means(self.objective.alpha, self.objective.text_weight), num_images

    def _packed_losses(self, batch: dict, generator, prefix: torch.Tensor | None = None) -> tuple[Losses, int]:
        """`_losses` for a native packed batch."""
        sums, num_images = self._packed_loss_sums(batch, generator, prefix)
        return sums.means(self.objective.alpha, self.objective.text_weight), num_images

    def _loss_sums(self, batch: dict, generator, prefix: torch.Tensor | None = None) -> tuple[LossSums, int]:
        """The loss terms (sums and counts) of a fixed-size batch and its number of images. `prefix` (B,): given
        prefix lengths instead of drawn ones."""
        images, tokens, token_mask = batch["image"], batch["tokens"], batch["token_mask"]
        causal = self.objective.prefix_attention
        if not causal:  # bidirectional encoder (objective.prefix_attention=false): no mask; M = N, no image targets
            prefix = torch.full((images.shape[0],), self.model.num_patches, dtype=torch.long)
        elif prefix is None:
            prefix = sample_prefix_lengths(images.shape[0], self.model.num_patches, generator=generator)
        if prefix.device != images.device:
            prefix = self._to_device(prefix, images)
        token_index = batch.get("token_index")  # from the collator: packing without a device sync
        pixels, logits = self.model(
            images, tokens, prefix if causal else None, token_mask, token_index
        )  # logits (n_real_tokens, V)
        return aimv2_loss_sums(
            pixels, logits, images, tokens, token_mask, prefix, self.spec.patch_size, token_index=token_index
        ), images.shape[0]

    def _packed_loss_sums(self, batch: dict, generator, prefix: torch.Tensor | None = None) -> tuple[LossSums, int]:
        """Native resolution: packed rows of images of any grid (aimv2.models.native); one prefix
        length per image, uniform in [1, N_i - 1] for its own N_i patches, unless `prefix` (n,) gives them."""
        patches, tokens, layout = batch["patches"], batch["tokens"], batch["layout"]
        causal = self.objective.prefix_attention
        if not causal or prefix is None:
            counts = torch.tensor([gh * gw for gh, gw in batch["grids"]])  # the collator's list: on the host, no sync
            # bidirectional (objective.prefix_attention=false): M_i = N_i, no image targets
            prefix = sample_prefix_lengths_per_image(counts, generator=generator) if causal else counts
        if prefix.device != patches.device:
            prefix = self._to_device(prefix, patches)
        backend = attention_backend(self.attention, patches.device)
        pixels, logits = self.model.forward_packed(patches, tokens, layout, prefix if causal else None, backend=backend)
        return packed_aimv2_loss_sums(pixels, logits, patches, tokens, layout, prefix), tokens.shape[0]

    @staticmethod
    def _to_device(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.is_cuda:  # from pinned memory the copy is asynchronous: no host sync
            return values.pin_memory().to(like.device, non_blocking=True)
        return values

    # -- the non-finite guard --------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer) -> None:
        """After backward (and the gradient all-reduce), before clipping and the optimizer step."""
        from aimv2.engine.trainer import skips_nonfinite_itself

        loss_ok = self._loss_finite if self._loss_finite is not None else torch.ones((), dtype=torch.bool)
        self._loss_finite = None
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if hasattr(norm, "full_tensor"):  # FSDP2: DTensor gradients; the norm over every rank's shards as a
            norm = norm.full_tensor()  # plain tensor (a DTensor cannot meet loss_ok or all_reduce below)
        norm_ok = torch.isfinite(norm)
        ok = loss_ok.to(self.device) & norm_ok.to(self.device)
        if skips_nonfinite_itself(self.trainer.strategy) or not skips_on_device(optimizer):
            # Decided on the host: the flag is read now (a sync; DeepSpeed's own overflow check syncs anyway).
            bad = self.trainer.strategy.reduce_boolean_decision(not bool(ok.item()), all=False)
            if bad and not skips_nonfinite_itself(self.trainer.strategy):
                optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients untouched
            self._count_nonfinite([1 if bad else 0])
        else:
            # Decided on the device: fused AdamW skips the whole update (weights, moments, step count)
            # when `found_inf` is nonzero, the protocol of torch's GradScaler. No host sync in the step.
            bad = (~ok).float().reshape(())  # the shape of the step counters it is subtracted from
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # sharded grads differ
            optimizer.found_inf = bad
            if self.device.type == "cuda":
                self._queue_flag(bad)
                self._count_nonfinite(self._read_flags(keep_newest=True))
            else:
                self._count_nonfinite([int(bad.item())])  # no device queue to stall: read now
        self.log("train/nonfinite_steps", float(self.nonfinite_total))

    def _queue_flag(self, flag: torch.Tensor) -> None:
        """Start a non-blocking copy of this step's flag to (pinned) host memory, marked by an event."""
        host = flag.to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((host, event))

    def _read_flags(self, keep_newest: bool) -> list[int]:
        """Flags whose copies are done. Every flag but this step's is a step old, long finished, so
        reading it never makes the host wait for the step it has just queued; `keep_newest=False`
        (checkpoint time, which syncs anyway) reads them all."""
        ready = []
        while self._pending and (len(self._pending) > 1 or not keep_newest or self._pending[0][1].query()):
            host, event = self._pending.pop(0)
            event.synchronize()
            ready.append(int(host.item()))
        return ready

    def _count_nonfinite(self, flags: list[int]) -> None:
        for bad in flags:
            self._steps_counted += 1
            if not bad:
                self._nonfinite_in_a_row = 0
                continue
            self.nonfinite_total += 1
            self._nonfinite_in_a_row += 1
            step = self._steps_counted - 1
            log.warning(
                "step %d: NaN/inf loss or gradient; step skipped (%d in a row, %d in total)",
                step,
                self._nonfinite_in_a_row,
                self.nonfinite_total,
            )
            if self._nonfinite_in_a_row >= self.max_nonfinite_steps:
                raise NonFiniteTraining(
                    f"training stopped at step {step}: {self._nonfinite_in_a_row} steps in a row had a NaN/inf loss "
                    f"or gradient (trainer.max_nonfinite_steps={self.max_nonfinite_steps}); lower optim.lr or check "
                    f"the data; the last checkpoint holds finite weights"
                )

    def on_train_start(self) -> None:
        self._steps_counted = self.trainer.global_step  # flags are counted in step order from here

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._count_nonfinite(self._read_flags(keep_newest=False))  # the saved count is complete
        for name, value in checkpoint.get("state_dict", {}).items():
            if torch.is_floating_point(value) and not bool(torch.isfinite(value).all()):
                raise RuntimeError(
                    f"refusing to write a checkpoint at step {self.trainer.global_step}: {name} holds NaN/inf"
                )
        schema.write(checkpoint, job="pretrain", nonfinite_steps=self.nonfinite_total)
        self.rank_counters.save(self._trainer, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        where = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
        self.nonfinite_total = int(schema.read(checkpoint, where).get("nonfinite_steps", 0))
        self.rank_counters.restore(self._trainer, checkpoint)

    # -- logging and optimizer -------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Host time between the end of one step and the start of the next: waiting for the data loader
        # (and the batch transfer). Near zero when the workers keep up; the share of step time it takes
        # is what a starved step loses.
        if self._last_batch_end is not None:
            self.log("train/data_wait_s", time.perf_counter() - self._last_batch_end)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._last_batch_end = time.perf_counter()

    def exclude_from_step_time(self, seconds: float) -> None:
        """Time spent between two training steps on something else (a held-out evaluation) is not
        charged to the next step's `train/samples_per_sec`."""
        if self._last_step_time is not None:
            self._last_step_time += seconds

    def _log_throughput(self, batch_size: int) -> None:
        # Wall time between consecutive steps on this rank, times the world size: global samples/s.
        now = time.perf_counter()
        if self._last_step_time is not None:
            rate = batch_size * self.trainer.world_size / max(now - self._last_step_time, 1e-9)
            self.log("train/samples_per_sec", rate, prog_bar=True)
        self._last_step_time = now

    def _total_steps(self) -> int:
        """Optimizer steps of the whole run (for the LR schedule), without building the train loader as
        Trainer.estimated_stepping_batches does: that would start the data stream before a resumed run
        has restored its position."""
        trainer = self.trainer
        stream = getattr(trainer.datamodule, "stream", None)
        by_epochs = None
        if trainer.max_epochs not in (None, -1) and getattr(stream, "plan", None) is not None:
            by_epochs = trainer.max_epochs * math.ceil(len(stream) / trainer.accumulate_grad_batches)
        if trainer.max_steps > 0:
            return min(trainer.max_steps, by_epochs) if by_epochs else trainer.max_steps
        if by_epochs is not None:
            return by_epochs
        return int(min(trainer.estimated_stepping_batches, 2**62))

    def configure_optimizers(self):
        cfg = self.optim_cfg
        optimizer = build_optimizer(
            self.model,
            cfg.lr,
            cfg.weight_decay,
            cfg.betas,
            cfg.eps,
            no_decay=self._no_decay,
            **optimizer_options(self.trainer),
        )
        schedule = warmup_cosine_schedule(
            optimizer, cfg.warmup_steps, self._total_steps(), cfg.lr, cfg.min_lr, cfg.warmup_start_lr
        )
        return {"optimizer": optimizer, "lr_scheduler": schedule}
