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

Reading. The set is cut into world x val.num_workers slots of contiguous sample ranges; a slot reads a range
of a local shard from its first sample, not from the shard's start (aimv2.data.tar_ranges): where each range
starts is found once per run at setup from the member headers, each shard by one rank, and shared with one
all-gather; the samples, and so the values, are those a read from the shard's start gives. `read_cost` gives
the tar samples an evaluation passes over (the held-out set itself; from each shard's start it was 32x to
1024x the set at 256 ranks); each batch carries its own count ("read").

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
from typing import Iterator, Mapping, Optional

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aimv2.checkpoints import schema
from aimv2.config.schema import ModelConfig, ValConfig
from aimv2.data.readers import stable_seed
from aimv2.data.samples import CorruptSample, ImageCaptionCollator, ImageCaptionProcessor, eval_transform
from aimv2.data.shardlist import resolve_shards
from aimv2.data.tar_ranges import (
    Index,
    Range,
    ScanStats,
    Start,
    index_ranges,
    is_remote,
    needed_starts,
    read_ranges,
    slot_starts,
)
from aimv2.data.tokenizer import CaptionTokenizer
from aimv2.data.workers import ignore_stop_signals, worker_context
from aimv2.errors import UserError
from aimv2.models.masks import sample_prefix_lengths
from aimv2.models.sizes import get_size, training_flops_per_sample

log = logging.getLogger(__name__)
KEY = "data.val.urls"
METRICS = ("val/loss", "val/loss_img", "val/loss_text", "val/samples", "val/skipped_samples",
           "val/train_samples", "val/train_flops")



# -- the held-out set --------------------------------------------------------------------------
def prefix_length(shard_url: str, key: str, num_patches: int) -> int:
    """The fixed prefix length M of a held-out sample, uniform in [1, N-1]: the same in every evaluation
    of every run, on any number of ranks, wherever the shard is stored (its file name, not its path)."""
    seed = stable_seed("aimv2-val-prefix", Path(shard_url).name, key)
    return int(sample_prefix_lengths(1, num_patches, generator=torch.Generator().manual_seed(seed))[0])


def plan_held_out(urls: str, max_samples: int, key: str = KEY) -> list[Range]:
    """The held-out set as sample ranges: the first `max_samples` (0: all) of the shards, in listed order.
    Resolves the shards now, so a missing one is reported before any model is built."""
    ranges, total = [], 0
    for shard in resolve_shards(urls, key, need_counts=True):  # manifests, else stats files, else tar listings
        count = shard.count
        take = count if not max_samples else min(count, max_samples - total)
        if take > 0:
            ranges.append((shard.url, 0, take))
            total += take
        if max_samples and total >= max_samples:
            break
    if not total:
        raise UserError(f"{key}: no samples in {urls!r}")
    return ranges


def split_ranges(ranges: list[Range], parts: int) -> list[list[Range]]:
    """The concatenated ranges cut into `parts` contiguous pieces of near-equal size (earlier pieces one
    larger), as ranges: part p holds samples [p*n//parts, (p+1)*n//parts) of the whole."""
    total = sum(end - first for _, first, end in ranges)
    bounds = [p * total // parts for p in range(parts + 1)]
    out: list[list[Range]] = [[] for _ in range(parts)]
    offset = 0
    for url, first, end in ranges:
        for p in range(parts):
            lo, hi = max(bounds[p], offset), min(bounds[p + 1], offset + end - first)
            if lo < hi:
                out[p].append((url, first + lo - offset, first + hi - offset))
        offset += end - first
    return out


def rank_slots(ranges: list[Range], num_workers: int, rank: int, world: int) -> list[list[Range]]:
    """Rank `rank`'s part of the set, one list of ranges per loader worker (one without workers)."""
    workers = max(1, num_workers)
    return split_ranges(ranges, world * workers)[rank * workers:(rank + 1) * workers]


def read_cost(ranges: list[Range], num_workers: int, world: int) -> dict:
    """The tar samples one evaluation of `ranges` passes over, over all world x max(1, num_workers) slots
    (pure: reads no file; remote shards known by their url). "before": each slot reading its shards from
    their start; "after": `read_ranges` given the index (a local shard's range from its first sample, a
    remote one's from the shard's start); "per_slot_before"/"per_slot_after": slot by slot (slot p is worker
    p % workers of rank p // workers); "held_out": the set's size, the "*_ratio"s are relative to it.
    "scan_shards"/"scan_samples": the shards indexed once per run and the samples whose member headers
    that walks, in all (it also reads the first header of the last sample wanted, per shard)."""
    slots = split_ranges(ranges, world * max(1, num_workers))
    before = [sum(end for _, _, end in units) for units in slots]
    after = [sum(end - (0 if is_remote(url) else first) for url, first, end in units) for units in slots]
    held_out = sum(end - first for _, first, end in ranges)
    needed = needed_starts(slots)
    return {"held_out": held_out, "slots": len(slots), "before": sum(before), "after": sum(after),
            "before_ratio": sum(before) / max(1, held_out), "after_ratio": sum(after) / max(1, held_out),
            "per_slot_before": before, "per_slot_after": after,
            "scan_shards": len(needed), "scan_samples": sum(firsts[-1] for firsts in needed.values())}


class HeldOutSamples(IterableDataset):
    """One rank's part of the held-out set, `slots[w]` read by worker w (`read_ranges`; `starts`: where its
    ranges start, none: every shard from its start), as batches of every `batch_size` raw samples (fewer
    images when some are corrupt, possibly none): {"image" (B, 3, H, W) normalized, "tokens", "token_mask",
    "token_index", "prefix" (B,), "skipped", "read" (the tar samples passed over for the batch)}."""

    def __init__(self, slots: list[list[Range]], tokenizer: CaptionTokenizer, img_size: int, num_patches: int,
                 batch_size: int, starts: Optional[Mapping[tuple[str, int], Start]] = None):
        super().__init__()
        self.slots, self.batch_size, self.num_patches = slots, batch_size, num_patches
        self.starts = dict(starts or {})
        self.process = ImageCaptionProcessor(eval_transform(img_size))
        self.collate = ImageCaptionCollator(tokenizer)

    @staticmethod
    def num_batches(slots: list[list[Range]], batch_size: int) -> int:
        return sum(math.ceil(sum(e - f for _, f, e in units) / batch_size) for units in slots)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        units = self.slots[info.id if info is not None else 0]
        items, prefixes, raw, skipped, read = [], [], 0, 0, 0
        for passed, sample in read_ranges(units, self.starts):
            raw += 1
            read += passed
            try:
                items.append(self.process(sample))
                prefixes.append(prefix_length(sample["__url__"], sample["__key__"], self.num_patches))
            except CorruptSample as err:
                log.warning("held-out set: skipping sample: %s", err)
                skipped += 1
            if raw == self.batch_size:
                yield self._batch(items, prefixes, skipped, read)
                items, prefixes, raw, skipped, read = [], [], 0, 0, 0
        if raw:
            yield self._batch(items, prefixes, skipped, read)

    def _batch(self, items: list, prefixes: list[int], skipped: int, read: int) -> dict:
        batch = self.collate(items)
        batch["prefix"] = torch.tensor(prefixes, dtype=torch.long)
        batch["skipped"] = skipped
        batch["read"] = read
        return batch


def held_out_loader(ranges: list[Range], tokenizer: CaptionTokenizer, img_size: int, num_patches: int,
                    batch_size: int, num_workers: int, rank: int = 0, world: int = 1,
                    index: Optional[Index] = None) -> DataLoader:
    """A finite loader of rank `rank`'s part; a fresh pass each time it is iterated. `index`: where ranges
    start (`index_held_out` over all ranks' slots); None: this rank indexes its own slots now."""
    slots = rank_slots(ranges, num_workers, rank, world)
    if index is None:
        index = index_ranges(slots)
    dataset = HeldOutSamples(slots, tokenizer, img_size, num_patches, batch_size, slot_starts(slots, index))
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      multiprocessing_context=worker_context(num_workers, dataset),
                      worker_init_fn=ignore_stop_signals if num_workers else None,
                      generator=torch.Generator())  # its base seed is drawn from here, not torch's global RNG


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
        self.ranges = plan_held_out(cfg.urls, cfg.max_samples)  # a missing shard fails here, at start-up
        self.loader: Optional[DataLoader] = None
        self.max_batches = 0  # forward passes per rank and evaluation (the most any rank has)
        self.samples_read = 0  # tar samples this rank passed over in its last evaluation
        # Training samples and their real caption tokens: global totals as of the last all-reduce, plus
        # this rank's since then; samples counted from the step number (an old checkpoint) have no tokens.
        self.train_samples, self.train_tokens, self.estimated_samples = 0, 0, 0
        self._new_samples, self._new_tokens = 0, 0
        self._row: Optional[tuple[int, dict]] = None  # computed, not yet written to the loggers
        self._restored_row: Optional[tuple[int, dict]] = None
        self._restored = False
        self._last_step: Optional[int] = None
        self._validated_step: Optional[int] = None
        self._steps_run = 0

    def flops_per_sample(self, text_tokens: float) -> float:
        return training_flops_per_sample(self.spec, self.img_size, self.tokenizer.max_length, text_tokens,
                                         self.tokenizer.vocab_size)["total"]

    # -- hooks ---------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        """Indexes where the slots' ranges start (each shard by one rank, shared by one all-gather: every
        rank is here) and builds this rank's loader."""
        rank, world, workers = trainer.global_rank, trainer.world_size, self.cfg.num_workers
        slots = split_ranges(self.ranges, world * max(1, workers))
        stats, start = ScanStats(), time.perf_counter()
        parts = _all_gather_objects((index_ranges(slots, rank, world, stats), stats), trainer)
        index = {url: starts for part, _ in parts for url, starts in part.items()}
        self.loader = held_out_loader(self.ranges, self.tokenizer, self.img_size, self.num_patches, self.batch_size,
                                      workers, rank, world, index)
        self.max_batches = max(HeldOutSamples.num_batches(rank_slots(self.ranges, workers, r, world),
                                                          self.batch_size) for r in range(world))
        if rank == 0:
            self._log_reading(slots, workers, world, index, [s for _, s in parts], time.perf_counter() - start)

    def _log_reading(self, slots: list[list[Range]], workers: int, world: int, index: Index,
                     scans: list[ScanStats], seconds: float) -> None:
        cost = read_cost(self.ranges, workers, world)
        log.info("held-out set: %d samples in %d shards over %d slots; an evaluation reads %d tar samples (%.2fx "
                 "the set; %.2fx reading each shard from its start); indexed %d shards at setup: %d headers, "
                 "%.1f MB, %.1f s", cost["held_out"], len(self.ranges), cost["slots"], cost["after"],
                 cost["after_ratio"], cost["before_ratio"], len(index), sum(s.headers for s in scans),
                 sum(s.bytes for s in scans) / 1e6, seconds)
        remote = [url for url, first, _ in (r for units in slots for r in units) if first > 0 and is_remote(url)]
        if remote:
            log.info("held-out set: %d remote shards (e.g. %s) cannot seek: their slots read them from their start",
                     len(set(remote)), remote[0])

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        if not self._restored and trainer.global_step > 0:
            self.estimated_samples = (trainer.global_step * trainer.accumulate_grad_batches * self.train_batch_size
                                      * trainer.world_size)
            self.train_samples = self.estimated_samples
            if trainer.is_global_zero:
                log.warning("the checkpoint does not count its training samples (it was written without data.val): "
                            "val/train_samples starts from step x global batch = %d", self.train_samples)
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
        schema.write(checkpoint, train_samples=self.train_samples, train_text_tokens=self.train_tokens,
                     train_samples_estimated=self.estimated_samples,
                     val_row=list(self._row) if self._row is not None else None)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = schema.read(checkpoint, trainer.ckpt_path or "the checkpoint")
        if "train_samples" in state:
            self.train_samples, self.train_tokens = int(state["train_samples"]), int(state["train_text_tokens"])
            self.estimated_samples = int(state.get("train_samples_estimated", 0))
            self._restored = True
        row = state.get("val_row")
        self._restored_row = (int(row[0]), dict(row[1])) if row else None

    # -- counting ------------------------------------------------------------------------------
    def _sync_counts(self, trainer, device: torch.device, extra: Optional[torch.Tensor] = None) -> torch.Tensor:
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
        metrics = {"val/loss": objective.text_weight * loss_text + objective.alpha * loss_img,
                   "val/loss_img": loss_img, "val/loss_text": loss_text,
                   "val/samples": samples, "val/skipped_samples": skipped,
                   "val/train_samples": float(self.train_samples), "val/train_flops": self.train_flops()}
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
        return torch.stack([losses.image.double() * weights[0], weights[0], losses.text.double() * weights[1],
                            weights[1], weights.new_zeros(()), weights.new_zeros(())])

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
        return {"image": torch.zeros(1, 3, self.img_size, self.img_size), "tokens": torch.zeros(1, length, dtype=torch.long),
                "token_mask": mask, "token_index": torch.zeros(1, dtype=torch.long), "prefix": torch.ones(1, dtype=torch.long)}

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


def validation_callbacks(cfg: ValConfig, model: ModelConfig, batch_size: int,
                         tokenizer: CaptionTokenizer) -> list[Callback]:
    """The callbacks for `build_trainer(extra_callbacks=...)`: none while `data.val.urls` is empty. Resolves
    the held-out shards now (a missing one is a UserError naming data.val.urls)."""
    if not cfg.urls:
        return []
    if model.native:
        raise UserError(f"{KEY}: the held-out validation loss does not support native-resolution runs "
                        "(model.native) yet; set data.val.urls=''")
    return [HeldOutLoss(cfg, model, batch_size, tokenizer)]


__all__ = ["METRICS", "HeldOutLoss", "HeldOutSamples", "held_out_loader", "plan_held_out", "prefix_length",
           "rank_slots", "read_cost", "split_ranges", "validation_callbacks"]
