"""The held-out validation loss of pre-training (`data.val`): the training objective on a fixed set of
held-out samples, every `data.val.every_n_steps` optimizer steps and at the last step.

Comparable across steps and across runs (a scaling ladder fits it against parameters and compute):

- the set: the first `max_samples` samples (0: all) of `data.val.urls`, shards in listed order and
  samples in tar order, whatever the number of ranks and workers (each reads a disjoint contiguous part);
- the preprocessing: the released encoders' eval transform (bicubic resize of the short side to
  `model.img_size`, center crop; no flip, no random crop);
- the prefix length of each sample: uniform in [1, N-1] from a seed of its shard's file name and its
  key (`prefix_length`), so every evaluation of every run scores the same prefixes;
- the loss: the module's own (`AIMv2PretrainModule._losses`, `aimv2.objective.aimv2_loss`) with the
  run's `objective.alpha` and `objective.text_weight`, in eval mode under `torch.no_grad`, in the run's
  precision. It is averaged exactly as one training batch holding the whole set would be: `val/loss_img`
  over every counted (sample, target patch) -- N - M patches of a sample with prefix M --,
  `val/loss_text` over every real caption token; each batch's means are weighted by those counts and
  summed in float64, over batches and ranks. `val/loss` = text_weight x loss_text + alpha x loss_img.

Also logged, for the scaling fit: `val/train_samples`, the training samples consumed so far by all
ranks (kept in every checkpoint, `checkpoint["aimv2"]["train_samples"]`, so it continues over resumes),
and `val/train_flops` = train_samples x `aimv2.models.sizes.training_flops_per_sample(...)["total"]`
at the mean real caption tokens of the consumed samples (exact: the estimate is linear in them).

Rows. The values go to the run's loggers directly (metrics.csv and TensorBoard), in the `step` row of
the step they follow (Lightning's 0-based column: the row of the K-th optimizer step is K-1), whatever
`trainer.log_every_n_steps` is: `self.log` would write them only on logging steps and then repeat them
in every later row. A row is written when the next batch starts (after Lightning's own row of that
step, so `TrimMetricsOnResume` still restores a missing training row), at the end of training, or on an
exception; a checkpoint taken in between carries it and a resumed run writes it if the file lacks it.

Reading. Through the evaluation reader (aimv2.data.every_sample): the set, as sample ranges, is cut into
world x max(1, val.num_workers) slots of contiguous ranges (`plan_ranges`), each sample read exactly once; a
slot reads a range of a local shard from its first sample, not from the shard's start: where each range
starts is found once per run at setup from the member headers, each shard by one rank, and shared with one
all-gather; the samples, and so the values, are those a read from the shard's start gives. A batch is
`val.batch_size` samples of a slot in tar order, less the corrupt ones (`HeldOutProcessor` gives a sample's
image, caption and prefix length, `HeldOutCollator` the batch). `read_cost` gives the tar samples an
evaluation passes over (the held-out set itself; benchmarks/results/scale.md compares reading each shard from
its start); each batch carries its own count ("read").

Side effects: none on training. Torch's, Python's and NumPy's random states are restored afterwards
(a DataLoader draws its base seed from torch's), the training stream and its checkpointed position are
not touched, every module's train/eval mode is restored, the time is not charged to
`train/samples_per_sec`. With several ranks it is a collective (one all-gather at setup for the index,
one all-reduce per evaluation, one per checkpoint for the sample counter), so every rank runs it, and every
rank runs the same number of forward passes (a rank short of batches runs stand-in ones) as sharded
strategies need. A run without `data.val.urls` gets none of this. Native-resolution runs (model.native) are
refused at config load.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from aimv2.checkpoints import schema
from aimv2.config.schema import ModelConfig, ValConfig
from aimv2.data.every_sample import ReadPlan, every_sample_loader, first_samples, plan_ranges, read_cost
from aimv2.data.readers import stable_seed
from aimv2.data.samples import ImageCaptionCollator, ImageCaptionProcessor, eval_transform
from aimv2.data.tar_ranges import Index, ScanStats, index_ranges, is_remote
from aimv2.data.tokenizer import CaptionTokenizer
from aimv2.errors import UserError
from aimv2.models.masks import sample_prefix_lengths
from aimv2.models.sizes import get_size, training_flops_per_sample

log = logging.getLogger(__name__)
KEY = "data.val.urls"
METRICS = (
    "val/loss",
    "val/loss_img",
    "val/loss_text",
    "val/samples",
    "val/skipped_samples",
    "val/train_samples",
    "val/train_flops",
)


# -- the held-out set --------------------------------------------------------------------------
def prefix_length(shard_url: str, key: str, num_patches: int) -> int:
    """The fixed prefix length M of a held-out sample, uniform in [1, N-1]: the same in every evaluation
    of every run, on any number of ranks, wherever the shard is stored (its file name, not its path)."""
    seed = stable_seed("aimv2-val-prefix", Path(shard_url).name, key)
    return int(sample_prefix_lengths(1, num_patches, generator=torch.Generator().manual_seed(seed))[0])


class HeldOutProcessor:
    """A raw held-out sample -> ((image (3, H, W) normalized, caption), its prefix length); CorruptSample
    when unusable."""

    def __init__(self, img_size: int, num_patches: int):
        self.process, self.num_patches = ImageCaptionProcessor(eval_transform(img_size)), num_patches

    def __call__(self, sample: dict) -> tuple[tuple[torch.Tensor, str], int]:
        return self.process(sample), prefix_length(sample["__url__"], sample["__key__"], self.num_patches)


class HeldOutCollator:
    """Processed samples -> {"image" (B, 3, H, W), "tokens", "token_mask", "token_index", "prefix" (B,)}."""

    def __init__(self, tokenizer: CaptionTokenizer):
        self.collate = ImageCaptionCollator(tokenizer)

    def __call__(self, items: list[tuple[tuple[torch.Tensor, str], int]]) -> dict:
        batch = self.collate([item for item, _ in items])
        batch["prefix"] = torch.tensor([prefix for _, prefix in items], dtype=torch.long)
        return batch


# -- the callback ------------------------------------------------------------------------------
@contextmanager
def _random_state_kept(device: torch.device):
    """Torch's (CPU and this CUDA device), Python's and NumPy's random states as they were."""
    py, npy = random.getstate(), np.random.get_state()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _distributed(trainer) -> bool:
    return trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_gather_objects(obj, trainer) -> list:
    """Every rank's `obj`, in rank order ([obj] in one process)."""
    if not _distributed(trainer):
        return [obj]
    out = [None] * trainer.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _all_reduce_sum(values: torch.Tensor, trainer) -> torch.Tensor:
    if _distributed(trainer):
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values


class HeldOutLoss(Callback):
    """Scores the held-out set at step boundaries where global_step % every_n_steps == 0 and at the last
    step (see the module doc); counts the training samples consumed for `val/train_samples`."""

    def __init__(self, cfg: ValConfig, model: ModelConfig, batch_size: int, tokenizer: CaptionTokenizer):
        self.cfg, self.img_size, self.tokenizer = cfg, model.img_size, tokenizer
        self.train_batch_size = batch_size
        self.batch_size = cfg.batch_size or batch_size
        self.spec = get_size(model.size)
        self.num_patches = (model.img_size // self.spec.patch_size) ** 2
        self.ranges = first_samples(cfg.urls, cfg.max_samples, KEY)  # a missing shard fails here, at start-up
        self.loader: DataLoader | None = None
        self.max_batches = 0  # forward passes per rank and evaluation (the most any rank has)
        self.samples_read = 0  # tar samples this rank passed over in its last evaluation
        # Training samples and their real caption tokens: global totals as of the last all-reduce, plus
        # this rank's since then; samples counted from the step number (an old checkpoint) have no tokens.
        self.train_samples, self.train_tokens, self.estimated_samples = 0, 0, 0
        self._new_samples, self._new_tokens = 0, 0
        self._row: tuple[int, dict] | None = None  # computed, not yet written to the loggers
        self._restored_row: tuple[int, dict] | None = None
        self._restored = False
        self._last_step: int | None = None
        self._validated_step: int | None = None
        self._steps_run = 0

    def flops_per_sample(self, text_tokens: float) -> float:
        return training_flops_per_sample(
            self.spec, self.img_size, self.tokenizer.max_length, text_tokens, self.tokenizer.vocab_size
        )["total"]

    # -- hooks ---------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        """Indexes where the slots' ranges start (each shard by one rank, shared by one all-gather: every
        rank is here) and builds this rank's loader."""
        rank, world = trainer.global_rank, trainer.world_size
        plan = plan_ranges(self.ranges, world, self.cfg.num_workers)
        stats, start = ScanStats(), time.perf_counter()
        parts = _all_gather_objects((index_ranges(plan.slots, rank, world, stats), stats), trainer)
        index = {url: starts for part, _ in parts for url, starts in part.items()}
        self.loader = every_sample_loader(
            plan,
            HeldOutProcessor(self.img_size, self.num_patches),
            HeldOutCollator(self.tokenizer),
            self.batch_size,
            rank,
            index,
        )
        self.max_batches = max(plan.num_batches(r, self.batch_size) for r in range(world))
        if rank == 0:
            self._log_reading(plan, index, [s for _, s in parts], time.perf_counter() - start)

    def _log_reading(self, plan: ReadPlan, index: Index, scans: list[ScanStats], seconds: float) -> None:
        cost, slots = read_cost(plan), plan.slots
        log.info(
            "held-out set: %d samples in %d shards over %d slots; an evaluation reads %d tar samples (%.2fx "
            "the set; %.2fx reading each shard from its start); indexed %d shards at setup: %d headers, "
            "%.1f MB, %.1f s",
            cost["held_out"],
            len(self.ranges),
            cost["slots"],
            cost["after"],
            cost["after_ratio"],
            cost["before_ratio"],
            len(index),
            sum(s.headers for s in scans),
            sum(s.bytes for s in scans) / 1e6,
            seconds,
        )
        remote = [url for url, first, _ in (r for units in slots for r in units) if first > 0 and is_remote(url)]
        if remote:
            log.info(
                "held-out set: %d remote shards (e.g. %s) cannot seek: their slots read them from their start",
                len(set(remote)),
                remote[0],
            )

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        if not self._restored and trainer.global_step > 0:
            self.estimated_samples = (
                trainer.global_step * trainer.accumulate_grad_batches * self.train_batch_size * trainer.world_size
            )
            self.train_samples = self.estimated_samples
            if trainer.is_global_zero:
                log.warning(
                    "the checkpoint does not count its training samples (it was written without data.val): "
                    "val/train_samples starts from step x global batch = %d",
                    self.train_samples,
                )
        if self._restored_row is not None and trainer.is_global_zero and not _csv_has_row(trainer, *self._restored_row):
            self._write(trainer, *self._restored_row)
        self._restored_row = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._flush(trainer)  # Lightning has written its row of the previous step by now
        if isinstance(batch, dict) and "image" in batch:
            self._new_samples += int(batch["image"].shape[0])
            # token_index: the collator's flat positions of the real tokens; its length needs no device sync
            index = batch.get("token_index")
            self._new_tokens += int(index.shape[0]) if index is not None else int(batch["token_mask"].sum())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # accumulating: not an optimizer-step boundary
        self._last_step = step
        self._steps_run += 1
        every = self.cfg.every_n_steps
        if (every and step % every == 0) or (trainer.max_steps > 0 and step >= trainer.max_steps):
            self._validate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._steps_run and self._validated_step != trainer.global_step:  # e.g. the last step of epoch mode
            self._validate(trainer, pl_module)
        self._flush(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._flush(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Every rank is here (a collective): the counter is summed over ranks before it is saved."""
        self._sync_counts(trainer, pl_module.device)
        schema.write(
            checkpoint,
            train_samples=self.train_samples,
            train_text_tokens=self.train_tokens,
            train_samples_estimated=self.estimated_samples,
            val_row=list(self._row) if self._row is not None else None,
        )

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = schema.read(checkpoint, trainer.ckpt_path or "the checkpoint")
        if "train_samples" in state:
            self.train_samples, self.train_tokens = int(state["train_samples"]), int(state["train_text_tokens"])
            self.estimated_samples = int(state.get("train_samples_estimated", 0))
            self._restored = True
        row = state.get("val_row")
        self._restored_row = (int(row[0]), dict(row[1])) if row else None

    # -- counting ------------------------------------------------------------------------------
    def _sync_counts(self, trainer, device: torch.device, extra: torch.Tensor | None = None) -> torch.Tensor:
        """One all-reduce: this rank's new samples and tokens (added to the totals) and `extra` (returned summed)."""
        new = torch.tensor([self._new_samples, self._new_tokens], dtype=torch.float64, device=device)
        values = _all_reduce_sum(torch.cat([new, extra]) if extra is not None else new, trainer).cpu()
        self.train_samples += int(values[0])
        self.train_tokens += int(values[1])
        self._new_samples, self._new_tokens = 0, 0
        return values[2:]

    def train_flops(self) -> float:
        counted = self.train_samples - self.estimated_samples
        tokens_per_sample = self.train_tokens / counted if counted > 0 else 0.0
        return self.train_samples * self.flops_per_sample(tokens_per_sample)

    # -- scoring -------------------------------------------------------------------------------
    def _validate(self, trainer, pl_module) -> None:
        start = time.perf_counter()
        sums = self.score(trainer, pl_module)
        img_sum, img_n, text_sum, text_n, samples, skipped = self._sync_counts(trainer, pl_module.device, sums).tolist()
        loss_img = img_sum / img_n if img_n else math.nan
        loss_text = text_sum / text_n if text_n else math.nan
        objective = pl_module.objective
        metrics = {
            "val/loss": objective.text_weight * loss_text + objective.alpha * loss_img,
            "val/loss_img": loss_img,
            "val/loss_text": loss_text,
            "val/samples": samples,
            "val/skipped_samples": skipped,
            "val/train_samples": float(self.train_samples),
            "val/train_flops": self.train_flops(),
        }
        self._flush(trainer)  # a row not yet written (never expected: rows are written when the next batch starts)
        self._row = (trainer.global_step - 1, metrics)
        self._validated_step = trainer.global_step
        if hasattr(pl_module, "exclude_from_step_time"):
            pl_module.exclude_from_step_time(time.perf_counter() - start)

    def score(self, trainer, pl_module) -> torch.Tensor:
        """This rank's sums (float64, on its device): image loss x counted patches, counted patches,
        text loss x real tokens, real tokens, samples scored, samples skipped."""
        device = pl_module.device
        sums = torch.zeros(6, dtype=torch.float64, device=device)
        samples, skipped, passes, read = 0, 0, 0, 0
        modes = {m: m.training for m in pl_module.modules()}
        with _random_state_kept(device), torch.no_grad():
            pl_module.eval()
            try:
                for batch in self.loader:
                    skipped += int(batch.pop("skipped"))
                    read += int(batch.pop("read"))
                    n = batch["image"].shape[0] if batch["image"].dim() == 4 else 0
                    if n == 0:
                        continue  # only corrupt samples: nothing to score
                    counted = float((self.num_patches - batch["prefix"]).sum())  # N - M target patches each
                    tokens = int(batch["token_index"].shape[0])
                    losses = self._forward(trainer, pl_module, batch)
                    passes += 1
                    samples += n
                    sums += self._batch_sums(losses, counted, tokens, device)
                if trainer.world_size > 1:  # sharded strategies: a forward is a collective, so every rank runs as many
                    for _ in range(self.max_batches - passes):
                        self._forward(trainer, pl_module, self._stand_in(device))
            finally:
                for module, mode in modes.items():
                    module.training = mode
        sums[4] += samples
        sums[5] += skipped
        self.samples_read = read
        log.debug("held-out set: this rank passed over %d tar samples for its %d", read, samples + skipped)
        return sums

    @staticmethod
    def _batch_sums(losses, counted: float, tokens: int, device) -> torch.Tensor:
        weights = torch.tensor([counted, tokens], dtype=torch.float64, device=device)
        return torch.stack(
            [
                losses.image.double() * weights[0],
                weights[0],
                losses.text.double() * weights[1],
                weights[1],
                weights.new_zeros(()),
                weights.new_zeros(()),
            ]
        )

    def _forward(self, trainer, pl_module, batch: dict):
        precision = trainer.precision_plugin
        batch = move_data_to_device(precision.convert_input(batch), pl_module.device)
        with precision.val_step_context():
            losses, _ = pl_module._losses(batch, None, prefix=batch["prefix"])
        return losses

    def _stand_in(self, device: torch.device) -> dict:
        """A one-sample batch whose forward pass only keeps a sharded strategy's collectives in step."""
        length = self.tokenizer.max_length
        mask = torch.zeros(1, length, dtype=torch.bool)
        mask[0, 0] = True
        return {
            "image": torch.zeros(1, 3, self.img_size, self.img_size),
            "tokens": torch.zeros(1, length, dtype=torch.long),
            "token_mask": mask,
            "token_index": torch.zeros(1, dtype=torch.long),
            "prefix": torch.ones(1, dtype=torch.long),
        }

    # -- rows ----------------------------------------------------------------------------------
    def _flush(self, trainer) -> None:
        if self._row is not None:
            self._write(trainer, *self._row)
            self._row = None

    @staticmethod
    def _write(trainer, step: int, metrics: dict) -> None:
        for logger in trainer.loggers:  # rank zero writes (the loggers' methods are rank_zero_only)
            logger.log_metrics(metrics, step=step)
            logger.save()


def _csv_has_row(trainer, step: int, metrics: dict) -> bool:
    """Whether the run's metrics.csv already holds the validation row of `step`."""
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger) and os.path.isfile(logger.experiment.metrics_file_path):
            with open(logger.experiment.metrics_file_path, newline="") as f:
                return any(int(r["step"]) == step and r.get("val/loss") for r in csv.DictReader(f))
    return False


def validation_callbacks(
    cfg: ValConfig, model: ModelConfig, batch_size: int, tokenizer: CaptionTokenizer
) -> list[Callback]:
    """The callbacks for `build_trainer(extra_callbacks=...)`: none while `data.val.urls` is empty. Resolves
    the held-out shards now (a missing one is a UserError naming data.val.urls)."""
    if not cfg.urls:
        return []
    if model.native:
        raise UserError(
            f"{KEY}: the held-out validation loss does not support native-resolution runs "
            "(model.native) yet; set data.val.urls=''"
        )
    return [HeldOutLoss(cfg, model, batch_size, tokenizer)]


__all__ = ["METRICS", "HeldOutCollator", "HeldOutLoss", "HeldOutProcessor", "prefix_length", "validation_callbacks"]
