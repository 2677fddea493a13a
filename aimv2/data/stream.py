"""Streaming batches from WebDataset shards, split across DDP ranks and dataloader workers, and
resumable at any batch.

Two modes:
- "resampled" (pre-training default): every (rank, worker) slot draws shards with replacement from
  each source and mixes sources per sample by weight. The stream is infinite, so no rank can run
  dry and hang DDP; `trainer.max_steps` ends the run.
- "epoch": each sample is read once per epoch. The epoch's samples (shards in a seeded order per
  epoch, counts from the shard manifests) are cut into one contiguous range per slot, equal to a
  sample (aimv2.data.epoch_plan), so every slot can fill the same number of full batches, and every
  rank runs the same number of steps (uneven batch counts hang DDP), whatever the data holds.

Corrupt samples in epoch mode are learnt only by decoding, on one rank, and nothing learnt on one
rank may shape a plan (ranks would plan different step counts). So a slot's batches are counted in
raw samples: batch k ends with `batch_size` usable samples, or once the slot has read (k + 1) x
batch_size + slack raw samples (slack: what its range holds beyond its full batches). Corrupt samples
use up the slack first (the remainder gets trained instead of dropped), then make batches lighter,
never fewer; a batch of corrupt samples only reads on to its first usable one. Only a range with no
raw sample left and batches still due repeats: one usable sample per due batch (a refill pass),
counted in the batch's `repeated` and logged. The global-count loss (aimv2.objective) weighs every
sample alike in batches of any size.

Exact resume. Everything random is a function of (seed, rank, worker, epoch, position): shard order
and draws, source mixing, the shuffle buffer (reset every `segment` raw samples) and each sample's
augmentation. Every batch carries `stream_pos`, where its worker's stream continues after it (pass,
segment, samples taken from the segment, batches produced, reader position at the segment start),
so a restarted worker re-opens that segment and skips what was consumed (reading tars, not decoding
them): at most one segment of raw samples. The loader (aimv2.data.loader) keeps these positions.
Each batch carries the corrupt samples skipped while it was assembled (`skipped`): an exact count,
a sample counted every epoch it is passed over.

Elastic resume (epoch mode): what a slot consumed follows from its position (`segment_bits` replays
its segment's shuffle); the loader (aimv2.data.loader) plans the rest of the epoch over what is left.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass, field, replace
from itertools import islice

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from aimv2.data.epoch_plan import Consumed, EpochPlan, plan_epoch, slot_read_order
from aimv2.data.native import Packing, pack_batches
from aimv2.data.readers import Mixture, ResampledShards, ShardSequence, read_tar, split_positions, stable_seed
from aimv2.data.samples import CorruptSample
from aimv2.data.shardlist import ShardInfo, ShardTable
from aimv2.processes import tune_cpu_allocator

log = logging.getLogger(__name__)
MAX_SKIP_WARNINGS = 5  # per worker and pass; the count is logged as a metric anyway
SEGMENT_MIN = 4096  # raw samples per shuffle segment, at least; bounds the skip work of a resume
HEAD = 4  # position fields before the reader's: pass, segment, taken from segment, batches produced


@dataclass
class StreamSource:
    name: str
    shards: ShardTable | list[ShardInfo] = field(default_factory=list)
    weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.shards, ShardTable):
            self.shards = ShardTable.of(list(self.shards))


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
        packing: Packing | None = None,
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
        self.gen = 0  # bumped when a run restarts its data (data.on_change=restart): a fresh, different sequence
        # Lanes: the seeded sample sequences, one per (rank, worker) slot at the start of a run. A resampled
        # run resumed on another number of slots keeps its lanes (a slot may run several, batch by batch)
        # and adds fresh ones if it has more slots; see lanes_of.
        self.lanes = world_size * self.workers_per_rank
        self.epoch = 0
        self._resume: dict | None = None
        self.base: Consumed | None = None  # this epoch's samples consumed under an earlier layout
        self.resumed_len = 0  # batches per rank of an epoch resumed under another layout (see __len__)
        self._shard_errors, self._warned, self._unreported = 0, 0, 0  # per iteration (reset in __iter__)
        # Every shard of every source by one index (the epoch's sample ids are (shard index, tar position)).
        self.shards = ShardTable.concat([src.shards for src in sources])
        if mode == "epoch":
            self.total = int(self.shards.counts.sum())
            if self.full_batches == 0:
                raise ValueError(
                    f"{self.total} samples over {world_size} rank(s) x {self.workers_per_rank} worker(s) leave a slot "
                    f"without one full batch of {batch_size}: lower data.batch_size or data.num_workers"
                )

    def __getstate__(self) -> dict:
        """What a data worker receives: one table of the shards, not two. Epoch mode reads shards by their
        index in the stream's table; resampled mode draws from each source's."""
        state = self.__dict__.copy()
        if self.mode == "epoch":
            state["sources"] = [replace(src, shards=ShardTable([], [])) for src in self.sources]
        else:
            state["shards"] = None
        return state

    @property
    def num_slots(self) -> int:
        return self.world_size * self.workers_per_rank

    @property
    def full_batches(self) -> int:
        """Batches per slot of a whole epoch."""
        return (self.total // self.num_slots) // self.batch_size

    def __len__(self) -> int:
        """Batches per rank per epoch (epoch mode only; the resampled stream has no length). An epoch
        resumed under another layout may have more (`resumed_len`); every epoch ends when its stream
        does, so the larger of the two lets both run to their end."""
        if self.mode != "epoch":
            raise TypeError("a resampled stream is infinite")
        return max(self.full_batches * self.workers_per_rank, self.resumed_len)

    def plan_for(self, epoch: int, base: Consumed | None) -> EpochPlan:
        """Epoch `epoch`'s plan (shard order seeded by the epoch); with `base` (samples consumed
        before, under another layout), the plan of what is left."""
        left = self.shards.counts if base is None else base.left_counts()
        return plan_epoch(left, self.num_slots, self.batch_size, seed=self._key(epoch, "order"))

    @property
    def head(self) -> int:
        """Position fields before the reader's; packing adds the batches done in the current window."""
        return HEAD + (self.packing is not None)

    def _position(self, start: tuple | None, reader_width: int) -> tuple[int, int, int, int, int, tuple]:
        """(pass, segment, taken, produced, batches done in the packing window, reader position) of a
        saved position; zeros for a fresh start."""
        start = tuple(start) if start else (0,) * (self.head + reader_width)
        pas, seg, taken, produced = start[:HEAD]
        done = start[HEAD] if self.packing is not None else 0
        return pas, seg, taken, produced, done, start[self.head :]

    @property
    def position_width(self) -> int:
        return self.head + (ShardSequence.width if self.mode == "epoch" else self._resampled_width)

    def layout(self) -> dict:
        """What a saved position depends on (every setting that changes the order of the samples); a
        resume under another layout cannot continue it as it is (the loader then resumes elastically:
        aimv2.data.loader)."""
        return {
            "mode": self.mode,
            "world_size": self.world_size,
            "workers": self.workers_per_rank,
            "batch_size": self.batch_size,
            "lanes": self.lanes,
            "seed": self.seed,
            "segment": self.segment,
            "shuffle_buffer": self.shuffle_buffer,
            "sources": [[s.name, len(s.shards)] for s in self.sources],
            **({"packing": list(astuple(self.packing))} if self.packing is not None else {}),
        }

    def lanes_of(self, slot: int) -> list[int]:
        """The lanes slot `slot` (= rank x workers + worker) runs: those congruent to it modulo the number
        of slots. In epoch mode, and in a run on its first layout, a slot's lane is the slot itself."""
        return list(range(slot, self.lanes, self.num_slots))  # lanes >= slots always

    def rank_lanes(self) -> list[int]:
        """The lanes this rank's slots run."""
        slots = range(self.rank * self.workers_per_rank, (self.rank + 1) * self.workers_per_rank)
        return [lane for slot in slots for lane in self.lanes_of(slot)]

    def set_epoch(self, epoch: int) -> None:
        self.start_iteration(epoch, None)

    def start_iteration(self, epoch: int, resume: dict | None) -> None:
        """Set before the workers start: the epoch, and optionally where this rank's stream continues,
        {"consumed": batches this rank consumed this epoch, "lanes": {lane: position}, "base": the
        samples consumed under an earlier layout (Consumed) or None}."""
        self.epoch, self._resume = epoch, resume
        self.base = resume.get("base") if resume else None

    # -- what a position has consumed (the elastic bookkeeping; aimv2.data.loader) -------------
    def segment_bits(self, plan: EpochPlan, lane: int, position: tuple) -> np.ndarray | None:
        """Which raw samples of the shuffle segment lane `lane` stands in were consumed (bool, over the
        segment's positions in the read order): the first `taken` outputs of the segment's shuffle,
        replayed from its seed over positions instead of samples (the shuffle never looks at them).
        None once the lane's first pass is over (its whole range is consumed)."""
        pas, seg, taken, _, _, _ = self._position(position, ShardSequence.width)
        if pas > 0:
            return None
        length = max(0, min(self.segment, plan.slot_size(lane) - seg * self.segment))
        rng = random.Random(self._key(lane, self.epoch, 0, "segment", seg))
        bits = np.zeros(length, dtype=bool)
        bits[list(islice(self._shuffled(iter(range(length)), rng), taken))] = True
        return bits

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None:
            tune_cpu_allocator()  # a worker allocates the same batch buffers again and again (aimv2.processes)
        physical = info.id if info is not None else 0
        workers = self.workers_per_rank
        if info is not None and info.num_workers != workers:
            raise RuntimeError(f"stream planned for {workers} workers, loader has {info.num_workers}")
        # The loader hands out batches round-robin from worker 0; after `consumed` batches the next one
        # is due from worker consumed % W, so physical worker p plays the logical worker that keeps the
        # uninterrupted order.
        consumed = self._resume["consumed"] if self._resume else 0
        slot = self.rank * workers + (physical + consumed) % workers
        starts = self._resume["lanes"] if self._resume else {}
        self._shard_errors, self._warned, self._unreported = 0, 0, 0
        if self.mode != "epoch":
            return self._round_robin(
                {lane: self._resampled(lane, starts.get(lane)) for lane in self.lanes_of(slot)},
                {lane: self._position(starts.get(lane), self._resampled_width)[3] for lane in self.lanes_of(slot)},
            )
        return self._epoch_slot(slot, starts.get(slot), self.plan_for(self.epoch, self.base))

    def _window(self) -> tuple[int, ...]:
        """An epoch position's packing-window field: 0 (in epoch mode a window is one batch)."""
        return (0,) * (self.head - HEAD)

    @property
    def _resampled_width(self) -> int:
        return ResampledShards.width * len(self.sources)

    @staticmethod
    def _round_robin(lanes: dict[int, Iterator[dict]], produced: dict[int, int]) -> Iterator[dict]:
        """Batches of several lanes in turn; after a resume the turn is the lane with the fewest batches
        produced (lowest lane first), which is where the uninterrupted turn order stood."""
        while True:
            lane = min(produced, key=lambda v: (produced[v], v))
            yield next(lanes[lane])
            produced[lane] += 1

    def _key(self, *parts) -> int:
        return stable_seed(self.seed, self.gen, *parts)

    def _read_one(self, url: str, size: int = -1) -> Iterator[dict]:
        def on_error(exn: Exception) -> bool:
            self._shard_errors += 1
            log.warning("skipping unreadable shard data: %s", " ".join(map(str, exn.args))[:300])
            return True

        return read_tar(url, on_error, size)

    def _read_shard(self, index: int) -> Iterator[dict]:
        return self._read_one(self.shards.url(index), int(self.shards.sizes[index]))

    def _shuffled(self, samples: Iterator, rng: random.Random) -> Iterator:
        if self.shuffle_buffer <= 1:
            return samples
        return wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(samples)

    def _segments(
        self, reader, take: Callable[[random.Random, int], Iterator[dict]], seg: int, taken: int, key: tuple
    ) -> Iterator[tuple[dict, tuple]]:
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

    def _resampled(self, lane: int, start: tuple | None) -> Iterator[dict]:
        key = (lane, self.epoch)
        widths = [ResampledShards.width] * len(self.sources)
        _, seg, taken, produced, done, flat = self._position(start, sum(widths))
        positions = split_positions(flat, widths)
        readers = [
            ResampledShards(src.shards.urls, self._read_one, str(self._key(*key, "source", i)), pos)
            for i, (src, pos) in enumerate(zip(self.sources, positions, strict=True))
        ]
        mixture = Mixture(readers, [src.weight for src in self.sources])
        tagged = self._segments(mixture, mixture.take, seg, taken, key)
        if self.packing is not None:
            yield from self._packed_batches(tagged, lane, 0, produced, done)
        else:
            yield from self._batches(tagged, lane, 0, produced)

    # -- epoch mode ------------------------------------------------------------------------
    def _epoch_slot(self, slot: int, start: tuple | None, plan: EpochPlan) -> Iterator[dict]:
        """Slot `slot`'s batches of the epoch (its lane is the slot itself): exactly the plan's
        batches_per_slot, whatever the data holds (see the module doc)."""
        quota = plan.batches_per_slot
        pas, seg, taken, produced, _, reader_pos = self._position(start, ShardSequence.width)
        base = self.base
        done = None if base is None else base.done
        slack = plan.slot_size(slot) - quota * self.batch_size
        while produced < quota:
            units = slot_read_order(plan, slot, self.seed, self.gen, self.epoch, pas)
            reader = ShardSequence(units, self._read_shard, tuple(reader_pos), done)
            samples = iter(reader)  # one pass over the slot's ranges, cut into segments below

            def take(rng: random.Random, n: int, samples=samples) -> Iterator[dict]:
                return islice(samples, n)

            tagged = self._segments(reader, take, seg, taken, (slot, self.epoch, pas))
            before = produced
            batches = (
                self._budget_batches(tagged, slot, produced, quota, slack)
                if pas == 0
                else self._repeat_batches(tagged, slot, pas, produced, quota)
            )
            for batch in batches:
                yield batch
                produced += 1
            if produced == before and pas > 0:
                raise RuntimeError(
                    f"data slot {slot} (rank {self.rank}) found no usable sample in "
                    f"{sorted({self.shards.url(shard) for shard, _, _ in units})}"
                )
            if produced < quota:
                # The range ran out of raw samples with batches still due (its tail is corrupt): a repeat
                # is unavoidable. Each due batch is one usable sample of the slot read again, counted.
                log.warning(
                    "data slot %d (rank %d): its range holds too few usable samples for its last %d "
                    "batch(es); each is one sample of the slot read again (data/repeated_samples)",
                    slot,
                    self.rank,
                    quota - produced,
                )
                pas, seg, taken, reader_pos = pas + 1, 0, 0, (0, 0, 0)

    def _epoch_item(self, sample: dict, lane: int, pas: int, seg: int, count: int):
        """A usable sample's item (packed mode: resized to the grid its plan, drawn from its own seed, gives),
        or None when it is corrupt."""
        if self.packing is None:
            return self._processed(sample, lane, pas, seg, count)
        try:
            with _cpu_rng(self._key(lane, self.epoch, pas, seg, count, "plan")):
                plan = self.packing.plan(sample)
        except CorruptSample as err:
            self._skip_warning(sample, err)
            return None
        return self._processed(sample, lane, pas, seg, count, plan)

    def _epoch_batch(self, items: list, keys: list, skipped: int, position: list, seed: int, repeated: int) -> dict:
        if self.packing is None:
            batch = self.collate(items)
        else:  # one batch: the items' rows, as many as they need
            grids = [
                (image.shape[-2] // self.packing.patch, image.shape[-1] // self.packing.patch) for image, _ in items
            ]
            (rows,) = pack_batches([gh * gw for gh, gw in grids], self.packing.row_tokens, None)
            batch = self.collate(items, rows)
        batch["repeated"] = repeated
        return self._tagged(batch, keys, skipped, position, seed)

    def _budget_batches(
        self, tagged: Iterator[tuple[dict, tuple]], lane: int, produced: int, quota: int, slack: int
    ) -> Iterator[dict]:
        """Batch k ends with `batch_size` usable samples, or once the slot has read (k + 1) x batch_size
        + slack raw samples and holds at least one (module doc)."""
        items, keys, skipped = [], [], 0
        for sample, (seg, count, start) in tagged:
            item = self._epoch_item(sample, lane, 0, seg, count)
            if item is None:
                skipped += 1
            else:
                items.append(item)
                keys.append(sample.get("__key__"))
            read = seg * self.segment + count  # raw samples of the slot read so far
            if items and (len(items) == self.batch_size or read >= (produced + 1) * self.batch_size + slack):
                produced += 1
                yield self._epoch_batch(
                    items,
                    keys,
                    skipped,
                    [lane, 0, seg, count, produced, *self._window(), *start],
                    self._key(lane, self.epoch, 0, seg, count, "batch"),
                    0,
                )
                items, keys, skipped = [], [], 0
                if produced == quota:
                    return
        self._unreported = skipped  # corrupt samples at the range's end: counted in the refill's first batch

    def _repeat_batches(
        self, tagged: Iterator[tuple[dict, tuple]], lane: int, pas: int, produced: int, quota: int
    ) -> Iterator[dict]:
        """A refill pass: one usable sample per due batch, each counted as repeated."""
        for sample, (seg, count, start) in tagged:
            item = self._epoch_item(sample, lane, pas, seg, count)
            if item is None:
                continue  # counted in the first pass
            produced += 1
            skipped, self._unreported = self._unreported, 0
            yield self._epoch_batch(
                [item],
                [sample.get("__key__")],
                skipped,
                [lane, pas, seg, count, produced, *self._window(), *start],
                self._key(lane, self.epoch, pas, seg, count, "batch"),
                1,
            )
            if produced == quota:
                return

    # -- samples and batches ---------------------------------------------------------------
    def _processed(self, sample: dict, lane: int, pas: int, seg: int, count: int, *args):
        """`process(sample, *args)` under the sample's own seed (identical augmentation after a resume),
        or None for a corrupt sample (warned about at most MAX_SKIP_WARNINGS times per iteration)."""
        try:
            with _cpu_rng(self._key(lane, self.epoch, pas, seg, count)):
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

    def _batches(self, tagged: Iterator[tuple[dict, tuple]], lane: int, pas: int, produced: int) -> Iterator[dict]:
        """Full batches of usable samples (resampled mode: the stream never ends)."""
        items, keys, skipped = [], [], 0
        for sample, (seg, count, start) in tagged:
            item = self._processed(sample, lane, pas, seg, count)
            if item is None:
                skipped += 1
                continue
            items.append(item)
            keys.append(sample.get("__key__"))
            if len(items) == self.batch_size:
                produced += 1
                yield self._tagged(
                    self.collate(items),
                    keys,
                    skipped,
                    [lane, pas, seg, count, produced, *start],
                    self._key(lane, self.epoch, pas, seg, count, "batch"),
                )
                items, keys, skipped = [], [], 0

    def _packed_batches(
        self, tagged: Iterator[tuple[dict, tuple]], lane: int, pas: int, produced: int, done: int
    ) -> Iterator[dict]:
        """Native resolution, resampled: windows of `packing.window` raw samples are measured without
        decoding (their grids), packed first-fit decreasing into batches of rows under the token budget
        (aimv2.data.native.pack_batches), then decoded batch by batch. A batch's position is its
        window's first sample plus the batches of that window already done (`done` on a resume), so a
        restart re-reads and re-packs the same window, skips those batches, and continues exactly.
        Corrupt samples count in the next batch the stream yields, also when a whole window has none."""
        packing = self.packing
        skipped = 0
        while True:
            window = list(islice(tagged, packing.window))
            if not window:
                return
            seg, count, start = window[0][1]
            measured = []
            for sample, tag in window:
                try:  # the crop is drawn from the sample's own seed: the same plan after a resume
                    with _cpu_rng(self._key(lane, self.epoch, pas, tag[0], tag[1], "plan")):
                        measured.append((sample, tag, packing.plan(sample)))
                except CorruptSample as err:
                    skipped += 1
                    self._skip_warning(sample, err)
            if done:  # a resumed window: what it skipped was counted before the checkpoint
                skipped = 0
            lengths = [plan.grid[0] * plan.grid[1] for _, _, plan in measured]
            batches = pack_batches(lengths, packing.row_tokens, packing.rows) if measured else []
            for k, rows in enumerate(batches):
                if k < done:  # emitted before the checkpoint this run resumed from, with every skip it counted
                    continue
                items, keys, index = [], [], {}
                for i in (i for row in rows for i in row):
                    sample, (s_seg, s_count, _), plan = measured[i]
                    item = self._processed(sample, lane, pas, s_seg, s_count, plan)
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
                yield self._tagged(
                    self.collate(items, placed),
                    keys,
                    skipped,
                    [lane, pas, seg, count - 1, produced, k + 1, *start],
                    self._key(lane, self.epoch, pas, seg, count, k, "batch"),
                )
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
