"""The one evaluation reader of shards: every sample exactly once, in order, last partial batch
included, split over (rank, worker) slots. Probe feature extraction and validation
(aimv2.probe.data) and compressor evaluation (aimv2.compress.module) read held-out shards through it.

Slots get whole shards (`plan_whole_shards`: longest first to the emptiest slot, or, with fewer
shards than slots, every slot reads all of them and keeps every k-th sample), so no sample is read
twice and none is dropped, whatever the number of processes. Sample counts only balance the
packing: shards without a count manifest, or with a wrong one, are read all the same (training's
epoch plan cuts shards into ranges by their counts instead; aimv2.data.stream). Corrupt samples (the processor raises
CorruptSample) and unreadable shard data are skipped with a warning; each batch carries in
`skipped` how many samples were passed over while it was assembled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aimv2.data.samples import CorruptSample
from aimv2.data.workers import worker_context
from aimv2.data.shardlist import ShardInfo

log = logging.getLogger(__name__)


@dataclass
class WholeShardPlan:
    slot_shards: list[list[str]]  # per slot; all shards for every slot when sample_split
    sample_split: bool  # True: each slot keeps sample i when i % num_slots == slot


def plan_whole_shards(shards: list[ShardInfo], num_slots: int) -> WholeShardPlan:
    if not shards:
        raise ValueError("no shards to read")
    if len(shards) < num_slots:
        return WholeShardPlan([[s.url for s in shards] for _ in range(num_slots)], True)
    loads, slots = [0] * num_slots, [[] for _ in range(num_slots)]
    for shard in sorted(shards, key=lambda s: (-s.count, s.url)):  # biggest shard to the emptiest slot
        i = min(range(num_slots), key=lambda j: (loads[j], j))
        slots[i].append(shard.url)
        loads[i] += shard.count
    return WholeShardPlan(slots, False)


class EverySample(IterableDataset):
    """Batches `collate(items) | {"skipped": n}` of this rank's share; `process(sample) -> item`."""

    def __init__(self, shards: list[ShardInfo], process: Callable[[dict], object], collate: Callable[[list], dict],
                 batch_size: int, rank: int = 0, world: int = 1, workers: int = 0):
        super().__init__()
        self.process, self.collate, self.batch_size = process, collate, batch_size
        self.rank, self.workers = rank, max(1, workers)
        self.plan = plan_whole_shards(shards, world * self.workers)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slot = self.rank * self.workers + (info.id if info is not None else 0)
        urls = self.plan.slot_shards[slot]
        samples = wds.tarfile_to_samples(handler=wds.warn_and_continue)({"url": u} for u in urls)
        if self.plan.sample_split:
            samples = (s for i, s in enumerate(samples) if i % len(self.plan.slot_shards) == slot)
        items, skipped = [], 0
        for sample in samples:
            try:
                items.append(self.process(sample))
            except CorruptSample as err:
                log.warning("skipping sample: %s", err)
                skipped += 1
                continue
            if len(items) == self.batch_size:
                yield self._batch(items, skipped)
                items, skipped = [], 0
        if items or skipped:
            yield self._batch(items, skipped)

    def _batch(self, items: list, skipped: int) -> dict:
        batch = self.collate(items)
        batch["skipped"] = torch.tensor(skipped)
        return batch


def every_sample_loader(shards: list[ShardInfo], process: Callable[[dict], object], collate: Callable[[list], dict],
                        batch_size: int, num_workers: int = 0, rank: int = 0, world: int = 1) -> DataLoader:
    """A DataLoader over `EverySample`: at most as many workers as this rank has shards (more would
    only read every k-th sample of the same tars)."""
    workers = min(num_workers, max(1, len(shards) // world)) if num_workers else 0
    dataset = EverySample(shards, process, collate, batch_size, rank, world, workers)
    return DataLoader(dataset, batch_size=None, num_workers=workers,
                      multiprocessing_context=worker_context(workers, dataset))
