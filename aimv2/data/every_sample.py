"""The one evaluation reader of shards: every planned sample exactly once, in an order fixed by the plan,
split over a run's (rank, loader worker) slots. Pre-training's held-out validation loss
(aimv2.pretraining.validation), probe feature extraction and validation (aimv2.probe.data) and compressor
evaluation (aimv2.compress.module) read through it; training streams through aimv2.data.stream instead.

What each slot reads is planned first (`ReadPlan`: per slot, the sample ranges it reads, in order):

- whole shards (`plan_whole_shards`): every sample of the shards. Each shard goes whole to one slot
  (the biggest first, to the slot with the fewest samples so far); with fewer shards than slots every slot
  reads all of them and keeps every k-th sample. Counts only balance the packing: shards without a count
  (unknown counts weigh as one sample), or with a wrong one, are read to their end all the same;
- sample ranges (`first_samples`, `plan_ranges`): a bounded part of a set, e.g. the first `max_samples` of
  a held-out set, by the shards' counts, cut into contiguous ranges of near-equal size, one part per slot.
  A range that starts inside a local shard is read from its first sample's byte offset
  (aimv2.data.tar_ranges; `index`: where the ranges start, located once per run), not from the shard's
  start, so the tar samples an evaluation passes over are the planned ones (`read_cost`).

Reading (`EverySample`, `every_sample_loader`): a slot reads its ranges in order, each sample exactly as a
read of its shard from the start gives it (plus "__url__", its shard, and "__index__", its number in the
shard), and hands it to the caller's `process(sample) -> item`. Every `batch_size` planned samples of a
slot make one batch, `collate(items)` plus "skipped" (those whose processor raised CorruptSample, skipped
with a warning; a batch may hold no item) and "read" (the tar samples passed over to reach them), both
0-d tensors; the last partial batch is included. Batch boundaries follow from the plan alone, never from
which samples are corrupt. Unreadable shard data is skipped with a warning (webdataset's
warn_and_continue). The loader draws nothing from torch's global random generator, and its workers
ignore the rank's stop signals (aimv2.data.workers).
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aimv2.data.samples import CorruptSample
from aimv2.data.shardlist import ShardInfo, resolve_shards
from aimv2.data.tar_ranges import Index, Range, Start, index_ranges, is_remote, needed_starts, read_ranges, slot_starts
from aimv2.data.workers import ignore_stop_signals, worker_context
from aimv2.errors import UserError

log = logging.getLogger(__name__)


# -- the plan ------------------------------------------------------------------------------------
@dataclass
class ReadPlan:
    """Who reads what. `slots[p]`: the ranges slot p reads, in order; slot p is loader worker
    p % max(1, workers) of rank p // max(1, workers) (`workers` 0: the rank's own process). `stride` > 1:
    slot p keeps only the samples i (counted over its reading) with i % stride == p."""

    slots: list[list[Range]]
    workers: int = 0
    stride: int = 1

    @property
    def per_rank(self) -> int:
        return max(1, self.workers)

    def rank_slots(self, rank: int) -> list[list[Range]]:
        """Rank `rank`'s slots, one per loader worker (one without workers)."""
        return self.slots[rank * self.per_rank : (rank + 1) * self.per_rank]

    def num_batches(self, rank: int, batch_size: int) -> int:
        """The batches rank `rank` yields: its slots' planned samples in batches of `batch_size`, the last
        of each slot partial (a plan of ranges that all end: `plan_ranges`)."""
        if self.stride > 1 or any(end is None for units in self.slots for _, _, end in units):
            raise ValueError("the batches of a whole-shard plan are not known before reading it")
        return sum(
            math.ceil(sum(end - first for _, first, end in units) / batch_size) for units in self.rank_slots(rank)
        )


def plan_whole_shards(shards: Iterable[ShardInfo], world: int = 1, num_workers: int = 0) -> ReadPlan:
    """Every sample of `shards` over `world` ranks: at most as many loader workers per rank as it gets
    shards (more would only read every k-th sample of the same tars), each shard read to its end."""
    shards = list(shards)
    if not shards:
        raise ValueError("no shards to read")
    workers = min(num_workers, max(1, len(shards) // world)) if num_workers else 0
    num_slots = world * max(1, workers)
    if len(shards) < num_slots:
        return ReadPlan([[(s.url, 0, None) for s in shards] for _ in range(num_slots)], workers, num_slots)
    slots: list[list[Range]] = [[] for _ in range(num_slots)]
    loads = [(0, p) for p in range(num_slots)]  # a heap of (samples so far, slot): the emptiest, lowest first
    for shard in sorted(shards, key=lambda s: (-s.count, s.url)):
        load, p = heapq.heappop(loads)
        slots[p].append((shard.url, 0, None))
        heapq.heappush(loads, (load + (shard.count if shard.count >= 0 else 1), p))
    return ReadPlan(slots, workers)


def first_samples(urls: str, max_samples: int, key: str) -> list[Range]:
    """The first `max_samples` samples (0: all) of the shards of `urls`, in listed order, as ranges, by the
    shards' counts (their manifests, else stats files, else tar listings). Resolves the shards now: a
    missing one, a remote one (its count is unknown) or no sample at all is a UserError naming `key`."""
    ranges, total = [], 0
    for shard in resolve_shards(urls, key, need_counts=True):
        take = shard.count if not max_samples else min(shard.count, max_samples - total)
        if take > 0:
            ranges.append((shard.url, 0, take))
            total += take
        if max_samples and total >= max_samples:
            break
    if not total:
        raise UserError(f"{key}: no samples in {urls!r}")
    return ranges


def plan_ranges(ranges: list[Range], world: int = 1, num_workers: int = 0) -> ReadPlan:
    """`ranges` (each with an end) concatenated and cut into world x max(1, num_workers) contiguous parts:
    slot p reads samples [p*n//slots, (p+1)*n//slots) of the n, in order, as ranges."""
    num_slots = world * max(1, num_workers)
    total = sum(end - first for _, first, end in ranges)
    bounds = [p * total // num_slots for p in range(num_slots + 1)]
    slots: list[list[Range]] = [[] for _ in range(num_slots)]
    offset = 0
    for url, first, end in ranges:
        for p in range(num_slots):
            lo, hi = max(bounds[p], offset), min(bounds[p + 1], offset + end - first)
            if lo < hi:
                slots[p].append((url, first + lo - offset, first + hi - offset))
        offset += end - first
    return ReadPlan(slots, num_workers)


def read_cost(plan: ReadPlan) -> dict:
    """The tar samples one evaluation of a plan of ranges (`plan_ranges`) passes over, over all its slots
    (pure: reads no file; remote shards known by their url). "before": each slot reading its shards from
    their start; "after": what `EverySample` reads given the index (a local shard's range from its first
    sample, a remote one's from the shard's start); "per_slot_before"/"per_slot_after": slot by slot;
    "held_out": the planned samples, the "*_ratio"s are relative to them. "scan_shards"/"scan_samples": the
    shards indexed once per run and the samples whose member headers that walks, in all (it also reads the
    first header of the last sample wanted, per shard)."""
    slots = plan.slots
    before = [sum(end for _, _, end in units) for units in slots]
    after = [sum(end - (0 if is_remote(url) else first) for url, first, end in units) for units in slots]
    held_out = sum(end - first for units in slots for _, first, end in units)
    needed = needed_starts(slots)
    return {
        "held_out": held_out,
        "slots": len(slots),
        "before": sum(before),
        "after": sum(after),
        "before_ratio": sum(before) / max(1, held_out),
        "after_ratio": sum(after) / max(1, held_out),
        "per_slot_before": before,
        "per_slot_after": after,
        "scan_shards": len(needed),
        "scan_samples": sum(firsts[-1] for firsts in needed.values()),
    }


# -- reading -------------------------------------------------------------------------------------
class EverySample(IterableDataset):
    """Rank `rank`'s part of `plan` as batches `collate(items) | {"skipped", "read"}` (see the module doc);
    loader worker w reads the rank's slot w. `starts`: where the slots' ranges that begin inside a local
    shard start (tar_ranges.slot_starts); a range without one is read from its shard's start."""

    def __init__(
        self,
        plan: ReadPlan,
        rank: int,
        process: Callable[[dict], object],
        collate: Callable[[list], dict],
        batch_size: int,
        starts: Mapping[tuple[str, int], Start] | None = None,
    ):
        super().__init__()
        self.slots, self.stride, self.first_slot = plan.rank_slots(rank), plan.stride, rank * plan.per_rank
        self.process, self.collate, self.batch_size = process, collate, batch_size
        self.starts = dict(starts or {})

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        mine = (self.first_slot + worker) % self.stride
        planned, items, skipped, read = 0, [], 0, 0
        for i, (passed, sample) in enumerate(read_ranges(self.slots[worker], self.starts)):
            read += passed
            if i % self.stride != mine:
                continue
            planned += 1
            try:
                items.append(self.process(sample))
            except CorruptSample as err:
                log.warning("skipping sample: %s", err)
                skipped += 1
            if planned == self.batch_size:
                yield self._batch(items, skipped, read)
                planned, items, skipped, read = 0, [], 0, 0
        if planned:
            yield self._batch(items, skipped, read)

    def _batch(self, items: list, skipped: int, read: int) -> dict:
        batch = self.collate(items)
        batch["skipped"] = torch.tensor(skipped)
        batch["read"] = torch.tensor(read)
        return batch


def every_sample_loader(
    plan: ReadPlan,
    process: Callable[[dict], object],
    collate: Callable[[list], dict],
    batch_size: int,
    rank: int = 0,
    index: Index | None = None,
) -> DataLoader:
    """A finite loader of rank `rank`'s part of `plan` with `plan.workers` workers; a fresh pass each time it
    is iterated. `index`: where the plan's ranges start (tar_ranges.index_ranges over every rank's slots,
    each rank indexing its share); None: this rank indexes its own slots now (a whole-shard plan has none)."""
    slots = plan.rank_slots(rank)
    if index is None:
        index = index_ranges(slots)
    dataset = EverySample(plan, rank, process, collate, batch_size, slot_starts(slots, index))
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=plan.workers,
        multiprocessing_context=worker_context(plan.workers, dataset),
        worker_init_fn=ignore_stop_signals if plan.workers else None,
        generator=torch.Generator(),
    )  # its base seed is drawn from here, not torch's global RNG


__all__ = [
    "EverySample",
    "ReadPlan",
    "every_sample_loader",
    "first_samples",
    "plan_ranges",
    "plan_whole_shards",
    "read_cost",
]
