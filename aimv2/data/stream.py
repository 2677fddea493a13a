"""Streaming batches from WebDataset shards, split across DDP ranks and dataloader workers, and
resumable at any batch.

Two modes:
- "resampled" (pre-training default): every (rank, worker) slot draws shards with replacement from
  each source and mixes sources per sample by weight. The stream is infinite, so no rank can run
  dry and hang DDP; `trainer.max_steps` ends the run.
- "epoch": each sample is read once per epoch. Shards are packed onto the slots so that slot sample
  counts (from the per-shard count manifests) are as even as possible, and every slot yields the
  same number of full batches, so every rank runs the same number of steps (uneven batch counts
  hang DDP). With fewer shards than slots, every slot reads all shards and keeps every k-th sample.

Exact resume. Everything random is a function of (seed, rank, worker, epoch, position): shard order
and draws, source mixing, the shuffle buffer (reset every `segment` raw samples) and each sample's
augmentation. Every batch carries `stream_pos`, where its worker's stream continues after it (pass,
segment, samples taken from the segment, batches produced, reader position at the segment start),
so a restarted worker re-opens that segment and skips what was consumed (reading tars, not decoding
them): at most one segment of raw samples. The loader (aimv2.data.loader) keeps these positions.
Batching happens in the workers so each batch can carry the number of corrupt samples skipped while
it was assembled; summing these gives an exact skip count.
"""

from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from dataclasses import astuple, dataclass, replace
from itertools import islice
from typing import Callable, Iterator, Optional

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from aimv2.cpu_tuning import tune_cpu_allocator
from aimv2.data.readers import Mixture, Resampler, ShardSequence, split_positions, stable_seed
from aimv2.data.samples import CorruptSample
from aimv2.data.native import Packing, pack_batches
from aimv2.data.shardlist import ShardInfo

log = logging.getLogger(__name__)
MAX_SKIP_WARNINGS = 5  # per worker and pass; the count is logged as a metric anyway
SEGMENT_MIN = 4096  # raw samples per shuffle segment, at least; bounds the skip work of a resume
HEAD = 4  # position fields before the reader's: pass, segment, taken from segment, batches produced


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
        packing: Optional[Packing] = None,
    ):
        super().__init__()
        self.sources, self.process, self.collate = sources, process, collate
        # Native resolution: batches by token budget (see `_packed_batches`); process(sample, grid) and
        # collate(items, rows) then take the packer's grid and row placement.
        if packing is not None and mode == "epoch":
            # Every rank must run the same number of steps, planned from sample counts (image sizes are
            # unknown until read): a batch is `batch_size` samples, packed into as many rows as they
            # need. Each sample once per epoch as in fixed-size epochs; the tokens per step vary.
            packing = replace(packing, window=batch_size, rows=None)
        self.packing = packing
        self.batch_size, self.mode = batch_size, mode
        self.rank, self.world_size = rank, world_size
        self.workers_per_rank = max(1, num_workers)
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.segment = max(SEGMENT_MIN, 8 * shuffle_buffer)
        self.gen = 0  # bumped when a run resumes under another layout: a fresh, different sequence
        self.epoch = 0
        self._resume: Optional[dict] = None
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

    @property
    def head(self) -> int:
        """Position fields before the reader's; packing adds the batches done in the current window."""
        return HEAD + (self.packing is not None)

    def _position(self, start: Optional[tuple], reader_width: int) -> tuple[int, int, int, int, int, tuple]:
        """(pass, segment, taken, produced, batches done in the packing window, reader position) of a
        saved position; zeros for a fresh start."""
        start = tuple(start) if start else (0,) * (self.head + reader_width)
        pas, seg, taken, produced = start[:HEAD]
        done = start[HEAD] if self.packing is not None else 0
        return pas, seg, taken, produced, done, start[self.head:]

    @property
    def position_width(self) -> int:
        return self.head + (ShardSequence.width if self.plan is not None else Resampler.width * len(self.sources))

    def layout(self) -> dict:
        """What a saved position depends on; a resume under another layout cannot continue it."""
        return {"mode": self.mode, "world_size": self.world_size, "workers": self.workers_per_rank,
                "batch_size": self.batch_size, "seed": self.seed, "segment": self.segment,
                "sources": [[s.name, len(s.shards)] for s in self.sources],
                **({"packing": list(astuple(self.packing))} if self.packing is not None else {})}

    def set_epoch(self, epoch: int) -> None:
        self.start_iteration(epoch, None)

    def start_iteration(self, epoch: int, resume: Optional[dict]) -> None:
        """Set before the workers start: the epoch, and optionally where this rank's stream continues,
        {"consumed": batches this rank consumed this epoch, "slots": {worker: position}}."""
        self.epoch, self._resume = epoch, resume

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None:
            tune_cpu_allocator()  # a worker allocates the same batch buffers again and again (aimv2.cpu_tuning)
        physical = info.id if info is not None else 0
        workers = self.workers_per_rank
        if info is not None and info.num_workers != workers:
            raise RuntimeError(f"stream planned for {workers} workers, loader has {info.num_workers}")
        # The loader hands out batches round-robin from worker 0; after `consumed` batches the next one
        # is due from worker consumed % W, so physical worker p plays the logical worker that keeps the
        # uninterrupted order.
        consumed = self._resume["consumed"] if self._resume else 0
        logical = (physical + consumed) % workers
        start = self._resume["slots"].get(logical) if self._resume else None
        self._shard_errors, self._warned = 0, 0
        if self.plan is None:
            return self._resampled(logical, start)
        return self._epoch_slot(logical, start)

    def _key(self, *parts) -> int:
        return stable_seed(self.seed, self.gen, *parts)

    def _read_one(self, url: str) -> Iterator[dict]:
        def on_error(exn: Exception) -> bool:
            self._shard_errors += 1
            log.warning("skipping unreadable shard data: %s", " ".join(map(str, exn.args))[:300])
            return True

        return wds.tarfile_to_samples(handler=on_error)([{"url": url}])

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            return samples
        return wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(samples)

    def _segments(self, reader, take: Callable[[random.Random, int], Iterator[dict]], seg: int, taken: int,
                  key: tuple) -> Iterator[tuple[dict, tuple]]:
        """(sample, (segment, taken so far, reader position at the segment start)); the shuffle buffer
        starts empty in every segment, so a segment can be replayed from its start alone."""
        while True:
            start, rng = reader.pos, random.Random(self._key(*key, "segment", seg))
            count = 0
            for sample in self._shuffled(take(rng, self.segment), rng):
                count += 1
                if count > taken:  # the first `taken` were consumed before a restart
                    yield sample, (seg, count, start)
            if count == 0:
                return
            seg, taken = seg + 1, 0

    def _resampled(self, logical: int, start: Optional[tuple]) -> Iterator[dict]:
        key = (self.rank, logical, self.epoch)
        widths = [Resampler.width] * len(self.sources)
        _, seg, taken, produced, done, flat = self._position(start, sum(widths))
        positions = split_positions(flat, widths)
        readers = [Resampler([s.url for s in src.shards], self._read_one, str(self._key(*key, "source", i)), pos)
                   for i, (src, pos) in enumerate(zip(self.sources, positions, strict=True))]
        mixture = Mixture(readers, [src.weight for src in self.sources])
        tagged = self._segments(mixture, mixture.take, seg, taken, key)
        if self.packing is not None:
            yield from self._packed_batches(tagged, logical, 0, produced, done)
        else:
            yield from self._batches(tagged, logical, 0, produced)

    def _epoch_slot(self, logical: int, start: Optional[tuple]) -> Iterator[dict]:
        plan, slot = self.plan, self.rank * self.workers_per_rank + logical
        quota = plan.batches_per_slot
        pas, seg, taken, produced, done, reader_pos = self._position(start, ShardSequence.width)
        while produced < quota:
            urls = list(plan.slot_shards[slot])
            keep = None
            if plan.sample_split:  # same order on every slot, so the i % k selection partitions samples
                random.Random(self._key(self.epoch, pas, "order")).shuffle(urls)
                k = len(plan.slot_shards)
                keep = lambda i, k=k: i % k == slot  # noqa: E731
            else:
                random.Random(self._key(self.rank, logical, self.epoch, pas, "order")).shuffle(urls)
            reader = ShardSequence(urls, self._read_one, keep, tuple(reader_pos))
            fresh = (seg, taken, tuple(reader_pos)) == (0, 0, (0, 0, 0))
            samples = iter(reader)  # one pass over the shards, cut into segments below

            def take(rng: random.Random, n: int, samples=samples) -> Iterator[dict]:
                return islice(samples, n)

            tagged = self._segments(reader, take, seg, taken, (self.rank, logical, self.epoch, pas))
            before = produced
            batches = (self._packed_batches(tagged, logical, pas, produced, done) if self.packing is not None
                       else self._batches(tagged, logical, pas, produced))
            for batch in batches:
                yield batch
                produced += 1
                if produced == quota:
                    return
            if produced == before and fresh:
                raise RuntimeError(f"data slot {slot} (rank {self.rank}) found no usable sample in {urls}")
            # Corrupt samples made this slot fall short of its planned batches: refill from its start,
            # so that all ranks still run the same number of steps.
            log.warning("slot %d fell %d batch(es) short (corrupt samples); re-reading its shards", slot,
                        quota - produced)
            pas, seg, taken, done, reader_pos = pas + 1, 0, 0, 0, (0, 0, 0)

    def _processed(self, sample: dict, logical: int, pas: int, seg: int, count: int, *args):
        """`process(sample, *args)` under the sample's own seed (identical augmentation after a resume),
        or None for a corrupt sample (warned about at most MAX_SKIP_WARNINGS times per iteration)."""
        try:
            with _cpu_rng(self._key(self.rank, logical, self.epoch, pas, seg, count)):
                return self.process(sample, *args)
        except CorruptSample as err:
            self._skip_warning(sample, err)
            return None

    def _skip_warning(self, sample: dict, err: Exception) -> None:
        if self._warned < MAX_SKIP_WARNINGS:
            self._warned += 1
            log.warning("skipping sample from %s: %s", sample.get("__url__"), err)

    def _tagged(self, batch: dict, keys: list, skipped: int, position: list, seed: int) -> dict:
        """A collated batch with what the loop around training needs: the skip and shard-error counts
        since the last batch, the keys, where this worker's stream continues, the batch's seed."""
        batch["skipped"] = torch.tensor(skipped)
        batch["shard_errors"] = torch.tensor(self._shard_errors)
        batch.setdefault("keys", keys)
        batch["stream_pos"] = position
        batch["seed"] = seed
        self._shard_errors = 0
        return batch

    def _batches(self, tagged: Iterator[tuple[dict, tuple]], logical: int, pas: int, produced: int) -> Iterator[dict]:
        items, keys, skipped = [], [], 0
        for sample, (seg, count, start) in tagged:
            item = self._processed(sample, logical, pas, seg, count)
            if item is None:
                skipped += 1
                continue
            items.append(item)
            keys.append(sample.get("__key__"))
            if len(items) == self.batch_size:
                produced += 1
                yield self._tagged(self.collate(items), keys, skipped, [logical, pas, seg, count, produced, *start],
                                   self._key(self.rank, logical, self.epoch, pas, seg, count, "batch"))
                items, keys, skipped = [], [], 0

    def _packed_batches(self, tagged: Iterator[tuple[dict, tuple]], logical: int, pas: int, produced: int,
                        done: int) -> Iterator[dict]:
        """Native resolution: windows of `packing.window` raw samples are measured without decoding
        (their grids), packed first-fit decreasing into batches of rows under the token budget
        (aimv2.data.native.pack_batches), then decoded batch by batch. A batch's position is its
        window's first sample plus the batches of that window already done (`done` on a resume), so a
        restart re-reads and re-packs the same window, skips those batches, and continues exactly.
        A corrupt header counts in the window's first batch, an undecodable image in its own."""
        packing = self.packing
        while True:
            window = list(islice(tagged, packing.window))
            if not window:
                return
            seg, count, start = window[0][1]
            measured, skipped = [], 0
            for sample, tag in window:
                try:  # the crop is drawn from the sample's own seed: the same plan after a resume
                    with _cpu_rng(self._key(self.rank, logical, self.epoch, pas, tag[0], tag[1], "plan")):
                        measured.append((sample, tag, packing.plan(sample)))
                except CorruptSample as err:
                    skipped += 1
                    self._skip_warning(sample, err)
            lengths = [plan.grid[0] * plan.grid[1] for _, _, plan in measured]
            batches = pack_batches(lengths, packing.row_tokens, packing.rows) if measured else []
            for k, rows in enumerate(batches):
                if k < done:  # emitted before the checkpoint this run resumed from, with every skip it counted
                    skipped = 0
                    continue
                items, keys, index = [], [], {}
                for i in (i for row in rows for i in row):
                    sample, (s_seg, s_count, _), plan = measured[i]
                    item = self._processed(sample, logical, pas, s_seg, s_count, plan)
                    if item is None:
                        skipped += 1
                        continue
                    index[i] = len(items)
                    items.append(item)
                    keys.append(sample.get("__key__"))
                placed = [row for row in ([index[i] for i in row if i in index] for row in rows) if row]
                if not placed:  # every image of this batch was corrupt: its count goes with the next one
                    continue
                produced += 1
                yield self._tagged(self.collate(items, placed), keys, skipped,
                                   [logical, pas, seg, count - 1, produced, k + 1, *start],
                                   self._key(self.rank, logical, self.epoch, pas, seg, count, k, "batch"))
                skipped = 0
            done = 0


@contextmanager
def _cpu_rng(seed: int):
    """The global CPU generator (which torchvision transforms draw from) seeded for one sample, then
    restored. torch.manual_seed would also seed every accelerator backend: 50x slower."""
    generator = torch.default_generator
    saved = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(saved)


from aimv2.data.loader import EpochAwareLoader  # noqa: E402  (re-exported: the loader that drives this stream)

__all__ = ["EpochAwareLoader", "EpochPlan", "ShardStream", "StreamSource", "plan_epoch"]
