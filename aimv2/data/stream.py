"""Streaming batches from WebDataset shards, split across DDP ranks and dataloader workers, and
resumable at any batch.

Two modes:
- "resampled" (pre-training default): every (rank, worker) slot draws shards with replacement from
  each source and mixes sources per sample by weight. The stream is infinite, so no rank can run
  dry and hang DDP; `trainer.max_steps` ends the run.
- "epoch": each sample is read once per epoch. The epoch's samples (shards in a seeded order per
  epoch, counts from the per-shard manifests) are cut into one contiguous range per slot, equal to
  a sample, so every slot yields the same number of full batches and every rank runs the same
  number of steps (uneven batch counts hang DDP); a slot reads at most its range's shards, plus the
  head of its first shard that it skips without decoding.

Exact resume. Everything random is a function of (seed, rank, worker, epoch, position): shard order
and draws, source mixing, the shuffle buffer (reset every `segment` raw samples) and each sample's
augmentation. Every batch carries `stream_pos`, where its worker's stream continues after it (pass,
segment, samples taken from the segment, batches produced, reader position at the segment start),
so a restarted worker re-opens that segment and skips what was consumed (reading tars, not decoding
them): at most one segment of raw samples. The loader (aimv2.data.loader) keeps these positions.
Batching happens in the workers so each batch can carry the number of corrupt samples skipped while
it was assembled; summing these gives an exact skip count.

Elastic resume (epoch mode). Every sample of the epoch has an id (its shard's offset in the source
order plus its index in the tar), and every batch carries the ids it trained on and the ids of the
corrupt samples it passed over. The loader keeps the epoch's ledger of them; a checkpoint stores the
union over ranks. A run resumed under another layout (ranks, workers, batch per rank) cannot
continue the saved positions, so it plans the rest of the epoch over the samples the ledger does not
hold (`base`): every sample still once per epoch, whatever the layout, the drop-last remainder of the
new plan aside (logged). A later resume under the same layout replans from the same base and
continues its positions exactly.
"""

from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from dataclasses import astuple, dataclass, replace
from itertools import islice
from typing import Callable, Iterator, Optional

import numpy as np
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
    """Epoch mode: the sample ranges each slot reads, and how many batches each slot yields."""

    slot_units: list[list[tuple[str, int, int]]]  # per slot: (shard url, first, end) in the shard's sample order
    batches_per_slot: int


def plan_epoch(shards: list[ShardInfo], num_slots: int, batch_size: int, seed: Optional[int] = None) -> EpochPlan:
    """The shards (in a seeded order when `seed` is given) laid end to end and cut into `num_slots`
    contiguous ranges of equal size (to a sample). Counts are per-shard sample counts; on an elastic
    resume, what is left of each shard, and a range then counts only the samples left."""
    if not shards:
        raise ValueError("no shards to plan an epoch over")
    order = [s for s in shards if s.count > 0]
    if seed is not None:
        random.Random(seed).shuffle(order)
    total = sum(s.count for s in order)
    bounds = [total * i // num_slots for i in range(num_slots + 1)]  # slot i: samples [bounds[i], bounds[i+1])
    units: list[list[tuple[str, int, int]]] = [[] for _ in range(num_slots)]
    slot, offset = 0, 0
    for shard in order:
        end = offset + shard.count
        while slot < num_slots and bounds[slot] < end:
            lo, hi = max(offset, bounds[slot]), min(end, bounds[slot + 1])
            if lo < hi:
                units[slot].append((shard.url, lo - offset, hi - offset))
            if bounds[slot + 1] > end:
                break
            slot += 1
        offset = end
    return EpochPlan(units, (total // num_slots) // batch_size)


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
        self.gen = 0  # bumped when a run resumes where it cannot continue: a fresh, different sequence
        # Lanes: the seeded sample sequences, one per (rank, worker) slot at the start of a run. A resampled
        # run resumed on another number of slots keeps its lanes (a slot may run several, batch by batch)
        # and adds fresh ones if it has more slots; see lanes_of.
        self.lanes = world_size * self.workers_per_rank
        self.epoch = 0
        self._resume: Optional[dict] = None
        self.plan = None
        self.base: Optional[np.ndarray] = None  # this epoch's samples consumed under an earlier layout
        self.resumed_len = 0  # batches per rank of an epoch resumed under another layout (see __len__)
        if mode == "epoch":
            all_shards = [s for src in sources for s in src.shards]
            self.shards = all_shards
            self.offsets, self.counts, total = {}, {}, 0
            for shard in all_shards:  # sample id = its shard's offset + its index in the tar
                self.offsets.setdefault(shard.url, total)
                self.counts.setdefault(shard.url, shard.count)
                total += shard.count
            self.total = total
            num_slots = world_size * self.workers_per_rank
            self.plan = plan_epoch(all_shards, num_slots, batch_size)  # the length; each epoch has its own order
            if self.plan.batches_per_slot == 0:
                raise ValueError(
                    f"{self.total} samples over {world_size} rank(s) x {self.workers_per_rank} worker(s) leave a slot "
                    f"without one full batch of {batch_size}: lower data.batch_size or data.num_workers")

    def __len__(self) -> int:
        """Batches per rank per epoch (epoch mode only; the resampled stream has no length). An epoch
        resumed under another layout may have more (`resumed_len`); every epoch ends when its stream
        does, so the larger of the two lets both run to their end."""
        if self.plan is None:
            raise TypeError("a resampled stream is infinite")
        return max(self.plan.batches_per_slot * self.workers_per_rank, self.resumed_len)

    def plan_for(self, epoch: int, base: Optional[np.ndarray]) -> EpochPlan:
        """Epoch `epoch`'s plan (shard order seeded by the epoch); with `base` (samples consumed before,
        by id), the plan of what is left."""
        left = self.shards
        if base is not None:
            left = [ShardInfo(s.url, s.count - int(base[self.offsets[s.url]:self.offsets[s.url] + s.count].sum()))
                    for s in self.shards]
        num_slots = self.world_size * self.workers_per_rank
        if not any(s.count > 0 for s in left):
            return EpochPlan([[] for _ in range(num_slots)], 0)
        return plan_epoch(left, num_slots, self.batch_size, seed=self._key(epoch, "order"))

    def sample_id(self, sample: dict) -> int:
        """The sample's id in the epoch (-1: beyond its shard's manifest count, not tracked)."""
        url, j = sample.get("__url__"), sample.get("__index__")
        if j is None or url not in self.offsets or j >= self.counts[url]:
            return -1
        return self.offsets[url] + j

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
        return self.head + (ShardSequence.width if self.plan is not None else self._resampled_width)

    def layout(self) -> dict:
        """What a saved position depends on; a resume under another layout cannot continue it as it is
        (the loader then resumes elastically: aimv2.data.loader)."""
        return {"mode": self.mode, "world_size": self.world_size, "workers": self.workers_per_rank,
                "batch_size": self.batch_size, "lanes": self.lanes, "seed": self.seed, "segment": self.segment,
                "sources": [[s.name, len(s.shards)] for s in self.sources],
                **({"packing": list(astuple(self.packing))} if self.packing is not None else {})}

    def lanes_of(self, slot: int) -> list[int]:
        """The lanes slot `slot` (= rank x workers + worker) runs: those congruent to it modulo the number
        of slots. In epoch mode, and in a run on its first layout, a slot's lane is the slot itself."""
        return list(range(slot, self.lanes, self.world_size * self.workers_per_rank))  # lanes >= slots always

    def set_epoch(self, epoch: int) -> None:
        self.start_iteration(epoch, None)

    def start_iteration(self, epoch: int, resume: Optional[dict]) -> None:
        """Set before the workers start: the epoch, and optionally where this rank's stream continues,
        {"consumed": batches this rank consumed this epoch, "lanes": {lane: position}, "base": ids
        consumed under an earlier layout (bool array) or None}."""
        self.epoch, self._resume = epoch, resume
        self.base = resume.get("base") if resume else None

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
        slot = self.rank * workers + (physical + consumed) % workers
        starts = self._resume["lanes"] if self._resume else {}
        self._shard_errors, self._warned, self._carry = 0, 0, ([], [], [], 0, [])
        if self.plan is None:
            return self._round_robin({lane: self._resampled(lane, starts.get(lane)) for lane in self.lanes_of(slot)},
                                     {lane: self._position(starts.get(lane), self._resampled_width)[3]
                                      for lane in self.lanes_of(slot)})
        return self._epoch_slot(slot, starts.get(slot), self.plan_for(self.epoch, self.base))

    @property
    def _resampled_width(self) -> int:
        return Resampler.width * len(self.sources)

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

    def _resampled(self, lane: int, start: Optional[tuple]) -> Iterator[dict]:
        key = (lane, self.epoch)
        widths = [Resampler.width] * len(self.sources)
        _, seg, taken, produced, done, flat = self._position(start, sum(widths))
        positions = split_positions(flat, widths)
        readers = [Resampler([s.url for s in src.shards], self._read_one, str(self._key(*key, "source", i)), pos)
                   for i, (src, pos) in enumerate(zip(self.sources, positions, strict=True))]
        mixture = Mixture(readers, [src.weight for src in self.sources])
        tagged = self._segments(mixture, mixture.take, seg, taken, key)
        if self.packing is not None:
            yield from self._packed_batches(tagged, lane, 0, produced, done)
        else:
            yield from self._batches(tagged, lane, 0, produced)

    def _epoch_slot(self, slot: int, start: Optional[tuple], plan: EpochPlan) -> Iterator[dict]:
        """Slot `slot`'s batches of the epoch (its lane is the slot itself)."""
        quota = plan.batches_per_slot
        pas, seg, taken, produced, done, reader_pos = self._position(start, ShardSequence.width)
        base = self.base
        consumed_before = None if base is None else (
            lambda url, j: j < self.counts[url] and bool(base[self.offsets[url] + j]))
        while produced < quota:
            units = list(plan.slot_units[slot])
            random.Random(self._key(slot, self.epoch, pas, "order")).shuffle(units)
            reader = ShardSequence(units, self._read_one, tuple(reader_pos), consumed_before)
            fresh = (seg, taken, tuple(reader_pos)) == (0, 0, (0, 0, 0))
            samples = iter(reader)  # one pass over the shards, cut into segments below

            def take(rng: random.Random, n: int, samples=samples) -> Iterator[dict]:
                return islice(samples, n)

            tagged = self._segments(reader, take, seg, taken, (slot, self.epoch, pas))
            before = produced
            batches = (self._packed_batches(tagged, slot, pas, produced, done) if self.packing is not None
                       else self._batches(tagged, slot, pas, produced, count_skips=pas == 0))
            for batch in batches:
                yield batch
                produced += 1
                if produced == quota:
                    return
            if produced == before and fresh:
                raise RuntimeError(f"data slot {slot} (rank {self.rank}) found no usable sample in "
                                   f"{sorted({url for url, _, _ in units})}")
            # Corrupt samples made this slot fall short of its planned batches: refill from its start,
            # so that all ranks still run the same number of steps. The refill repeats samples: the loader
            # counts them (data/repeated_samples); its corrupt samples were counted in the first pass.
            log.warning("slot %d fell %d batch(es) short (corrupt samples); re-reading its shards: the "
                        "repeated samples are counted in data/repeated_samples", slot, quota - produced)
            pas, seg, taken, done, reader_pos = pas + 1, 0, 0, 0, (0, 0, 0)

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

    def _tagged(self, batch: dict, keys: list, skipped: int, position: list, seed: int,
                ids: Optional[list] = None, skipped_ids: Optional[list] = None) -> dict:
        """A collated batch with what the loop around training needs: the skip and shard-error counts
        since the last batch, the keys, where this worker's stream continues, the batch's seed; in
        epoch mode the ids of its samples and of the corrupt ones passed over (the loader's ledger)."""
        if self.plan is not None:
            batch["ids"], batch["skipped_ids"] = ids or [], skipped_ids or []
        batch["skipped"] = torch.tensor(skipped)
        batch["shard_errors"] = torch.tensor(self._shard_errors)
        batch.setdefault("keys", keys)
        batch["stream_pos"] = position
        batch["seed"] = seed
        self._shard_errors = 0
        return batch

    def _batches(self, tagged: Iterator[tuple[dict, tuple]], lane: int, pas: int, produced: int,
                 count_skips: bool = True) -> Iterator[dict]:
        """Full batches. What a pass leaves after its last full batch (samples, and corrupt ones passed) is
        carried into the next pass (`_carry`), so a refill pass re-reads only the samples the batch still
        lacks; it does not count the corrupt samples again (count_skips=False)."""
        items, keys, ids, skipped, skipped_ids = self._carry  # taken, so that no other lane shares its lists
        self._carry = ([], [], [], 0, [])
        for sample, (seg, count, start) in tagged:
            item = self._processed(sample, lane, pas, seg, count)
            if item is None:
                skipped += count_skips
                skipped_ids.append(self.sample_id(sample) if self.plan is not None else -1)
                continue
            items.append(item)
            keys.append(sample.get("__key__"))
            ids.append(self.sample_id(sample) if self.plan is not None else -1)
            if len(items) == self.batch_size:
                produced += 1
                yield self._tagged(self.collate(items), keys, skipped, [lane, pas, seg, count, produced, *start],
                                   self._key(lane, self.epoch, pas, seg, count, "batch"), ids, skipped_ids)
                items, keys, ids, skipped, skipped_ids = [], [], [], 0, []
        self._carry = (items, keys, ids, skipped, skipped_ids)

    def _packed_batches(self, tagged: Iterator[tuple[dict, tuple]], lane: int, pas: int, produced: int,
                        done: int) -> Iterator[dict]:
        """Native resolution: windows of `packing.window` raw samples are measured without decoding
        (their grids), packed first-fit decreasing into batches of rows under the token budget
        (aimv2.data.native.pack_batches), then decoded batch by batch. A batch's position is its
        window's first sample plus the batches of that window already done (`done` on a resume), so a
        restart re-reads and re-packs the same window, skips those batches, and continues exactly.
        A corrupt header counts in the window's first batch, an undecodable image in its own."""
        packing, counted = self.packing, int(pas == 0)  # a refill pass does not count corrupt samples again
        sample_id = self.sample_id if self.plan is not None else (lambda sample: -1)
        while True:
            window = list(islice(tagged, packing.window))
            if not window:
                return
            seg, count, start = window[0][1]
            measured, skipped, skipped_ids = [], 0, []
            for sample, tag in window:
                try:  # the crop is drawn from the sample's own seed: the same plan after a resume
                    with _cpu_rng(self._key(lane, self.epoch, pas, tag[0], tag[1], "plan")):
                        measured.append((sample, tag, packing.plan(sample)))
                except CorruptSample as err:
                    skipped += counted
                    skipped_ids.append(sample_id(sample))
                    self._skip_warning(sample, err)
            lengths = [plan.grid[0] * plan.grid[1] for _, _, plan in measured]
            batches = pack_batches(lengths, packing.row_tokens, packing.rows) if measured else []
            for k, rows in enumerate(batches):
                if k < done:  # emitted before the checkpoint this run resumed from, with every skip it counted
                    skipped, skipped_ids = 0, []
                    continue
                items, keys, ids, index = [], [], [], {}
                for i in (i for row in rows for i in row):
                    sample, (s_seg, s_count, _), plan = measured[i]
                    item = self._processed(sample, lane, pas, s_seg, s_count, plan)
                    if item is None:
                        skipped += counted
                        skipped_ids.append(sample_id(sample))
                        continue
                    index[i] = len(items)
                    items.append(item)
                    keys.append(sample.get("__key__"))
                    ids.append(sample_id(sample))
                placed = [row for row in ([index[i] for i in row if i in index] for row in rows) if row]
                if not placed:  # every image of this batch was corrupt: its count goes with the next one
                    continue
                produced += 1
                yield self._tagged(self.collate(items, placed), keys, skipped,
                                   [lane, pas, seg, count - 1, produced, k + 1, *start],
                                   self._key(lane, self.epoch, pas, seg, count, k, "batch"),
                                   ids, skipped_ids)
                skipped, skipped_ids = 0, []
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
