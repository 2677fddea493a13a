"""Streaming batches from WebDataset shards, split across DDP ranks and dataloader workers.

Two modes:
- "resampled" (pre-training default): every (rank, worker) slot draws shards with replacement from
  each source, seeded by (seed, rank, worker, epoch), and mixes sources per sample by weight. The
  stream is infinite, so no rank can run dry and hang DDP; `trainer.max_steps` ends the run.
- "epoch": each sample is read once per epoch. Shards are packed onto the slots so that slot sample
  counts (from the per-shard count manifests) are as even as possible, and every slot yields the
  same number of full batches, so every rank runs the same number of steps (uneven batch counts
  hang DDP). With fewer shards than slots, every slot reads all shards and keeps every k-th sample.
Batching happens in the workers so that each batch can carry the number of corrupt samples
skipped while it was assembled; summing these gives an exact skip count.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aimv2.data.samples import CorruptSample
from aimv2.data.shardlist import ShardInfo

log = logging.getLogger(__name__)
MAX_SKIP_WARNINGS = 5  # per worker and pass; the count is logged as a metric anyway


@dataclass
class StreamSource:
    name: str
    shards: list[ShardInfo]
    weight: float = 1.0


@dataclass
class EpochPlan:
    """Epoch mode: which shards each slot reads, and how many batches each slot yields."""

    slot_shards: list[list[str]]  # per slot; all shards for every slot when sample_split
    sample_split: bool  # True: each slot keeps sample i when i % num_slots == slot
    batches_per_slot: int


def plan_epoch(shards: list[ShardInfo], num_slots: int, batch_size: int) -> EpochPlan:
    if not shards:
        raise ValueError("no shards to plan an epoch over")
    if len(shards) >= num_slots:
        # Longest-processing-time packing: biggest shard to the emptiest slot.
        loads, slots = [0] * num_slots, [[] for _ in range(num_slots)]
        for shard in sorted(shards, key=lambda s: (-s.count, s.url)):
            i = min(range(num_slots), key=lambda j: (loads[j], j))
            slots[i].append(shard.url)
            loads[i] += shard.count
        per_slot, split = loads, False
    else:
        total = sum(s.count for s in shards)
        slots = [[s.url for s in shards] for _ in range(num_slots)]
        per_slot, split = [len(range(i, total, num_slots)) for i in range(num_slots)], True
    return EpochPlan(slots, split, min(per_slot) // batch_size)


class ShardStream(IterableDataset):
    """Batches from shards. `process(sample) -> item` may raise CorruptSample; `collate(items) -> dict`."""

    def __init__(
        self,
        sources: list[StreamSource],
        *,
        process: Callable[[dict], object],
        collate: Callable[[list], dict],
        batch_size: int,
        mode: str = "resampled",
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
    ):
        super().__init__()
        self.sources, self.process, self.collate = sources, process, collate
        self.batch_size, self.mode = batch_size, mode
        self.rank, self.world_size = rank, world_size
        self.workers_per_rank = max(1, num_workers)
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.epoch = 0
        self.plan = None
        if mode == "epoch":
            all_shards = [s for src in sources for s in src.shards]
            num_slots = world_size * self.workers_per_rank
            self.plan = plan_epoch(all_shards, num_slots, batch_size)
            if self.plan.batches_per_slot == 0:
                total = sum(s.count for s in all_shards)
                raise ValueError(
                    f"{total} samples over {world_size} rank(s) x {self.workers_per_rank} worker(s) leave a slot "
                    f"without one full batch of {batch_size}: lower data.batch_size or data.num_workers")

    def __len__(self) -> int:
        """Batches per rank per epoch (epoch mode only; the resampled stream has no length)."""
        if self.plan is None:
            raise TypeError("a resampled stream is infinite")
        return self.plan.batches_per_slot * self.workers_per_rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers_per_rank:
            raise RuntimeError(f"stream planned for {self.workers_per_rank} workers, loader has {info.num_workers}")
        slot = self.rank * self.workers_per_rank + worker
        rng = random.Random(f"{self.seed}-{self.rank}-{worker}-{self.epoch}")
        self._shard_errors = 0
        if self.plan is None:
            yield from self._batches(self._shuffled(self._mixed_resampled(rng), rng))
        else:
            yield from self._epoch_batches(slot, rng)

    def _read(self, urls: Iterator[str]) -> Iterator[dict]:
        def on_error(exn: Exception) -> bool:
            self._shard_errors += 1
            log.warning("skipping unreadable shard data: %s", " ".join(map(str, exn.args))[:300])
            return True

        return wds.tarfile_to_samples(handler=on_error)({"url": url} for url in urls)

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            return samples
        return wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(samples)

    def _mixed_resampled(self, rng: random.Random) -> Iterator[dict]:
        def endless(source: StreamSource) -> Iterator[dict]:
            urls = [s.url for s in source.shards]
            while True:
                yield from self._read(iter([rng.choice(urls)]))

        streams = [endless(src) for src in self.sources]
        weights = [src.weight for src in self.sources]
        while True:
            yield next(streams[rng.choices(range(len(streams)), weights)[0]])

    def _epoch_batches(self, slot: int, rng: random.Random) -> Iterator[dict]:
        plan = self.plan
        quota, produced, passes = plan.batches_per_slot, 0, 0
        while produced < quota:
            urls = list(plan.slot_shards[slot])
            if plan.sample_split:  # same order on every slot, so the i % k selection partitions samples
                random.Random(f"{self.seed}-{self.epoch}-{passes}").shuffle(urls)
                samples = (s for i, s in enumerate(self._read(iter(urls))) if i % len(plan.slot_shards) == slot)
            else:
                rng.shuffle(urls)
                samples = self._read(iter(urls))
            before = produced
            for batch in self._batches(self._shuffled(samples, rng)):
                yield batch
                produced += 1
                if produced == quota:
                    return
            passes += 1
            if produced == before:
                raise RuntimeError(f"data slot {slot} (rank {self.rank}) found no usable sample in {urls}")
            # Corrupt samples made this slot fall short of its planned batches: refill from its start,
            # so that all ranks still run the same number of steps.
            log.warning("slot %d fell %d batch(es) short (corrupt samples); re-reading its shards", slot, quota - produced)

    def _batches(self, samples: Iterator[dict]) -> Iterator[dict]:
        items, skipped, warned = [], 0, 0
        for sample in samples:
            try:
                items.append(self.process(sample))
            except CorruptSample as err:
                skipped += 1
                if warned < MAX_SKIP_WARNINGS:
                    warned += 1
                    log.warning("skipping sample from %s: %s", sample.get("__url__"), err)
                continue
            if len(items) == self.batch_size:
                batch = self.collate(items)
                batch["skipped"] = torch.tensor(skipped)
                batch["shard_errors"] = torch.tensor(self._shard_errors)
                yield batch
                items, skipped, self._shard_errors = [], 0, 0


class EpochAwareLoader(DataLoader):
    """A DataLoader that tells its stream which epoch starts, before (non-persistent) workers copy it."""

    def __init__(self, dataset: ShardStream, **kwargs):
        kwargs.setdefault("persistent_workers", False)
        super().__init__(dataset, batch_size=None, **kwargs)
        self._epochs_started = 0

    def __iter__(self):
        self.dataset.set_epoch(self._epochs_started)
        self._epochs_started += 1
        return super().__iter__()

