"""The epoch plan of the epoch-mode stream (aimv2.data.stream): which samples each data slot reads, and
which samples of an epoch are already consumed when a run resumes under another layout.

Everything here is arithmetic over per-shard sample counts: O(shards) memory and time, never a value
per sample (an epoch of 3.5B samples in 350,000 shards is planned in well under a second).

- `plan_epoch`: the shards in a seeded order laid end to end and cut into one contiguous range per
  slot, equal to a sample (so every slot can fill the same number of batches); a slot's ranges
  (`EpochPlan.slot_units`) are found by bisection, on demand.
- `Consumed`: the samples of an epoch consumed under earlier layouts (trained on, or passed over as
  corrupt): per shard none, all, or a packed bitmap of its samples for the few shards that slots left
  half-read (about 2.5 per slot: 1.3 KB each for shards of 10,000). Sample indices are positions in
  the shard's tar; the plan of what is left counts, per
  shard, only the samples not consumed (their "ranks").
- `Consumed.add_read`: what one slot consumed, from where its stream stood: the first samples of its
  read order (`slot_read_order`), and the consumed ones of the shuffle segment it was in (a bitmap over
  that segment's positions).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from aimv2.data.readers import stable_seed

Unit = tuple[int, int, int]  # (shard index, first, end): ranks [first, end) of the shard's samples not consumed


@dataclass
class EpochPlan:
    order: np.ndarray  # (n,) shard indices in this epoch's order (shards with samples left)
    ends: np.ndarray  # (n,) where each ordered shard's samples end in the epoch's sequence
    num_slots: int
    batch_size: int

    @property
    def total(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    @property
    def batches_per_slot(self) -> int:
        """Full batches every slot's range can hold (ranges differ by at most one sample)."""
        return (self.total // self.num_slots) // self.batch_size

    def bounds(self, slot: int) -> tuple[int, int]:
        """Slot `slot` reads samples [lo, hi) of the epoch's sequence."""
        return self.total * slot // self.num_slots, self.total * (slot + 1) // self.num_slots

    def slot_size(self, slot: int) -> int:
        lo, hi = self.bounds(slot)
        return hi - lo

    def slot_units(self, slot: int) -> list[Unit]:
        """The ranges of shards slot `slot` reads, in the epoch's order."""
        lo, hi = self.bounds(slot)
        units: list[Unit] = []
        i = int(np.searchsorted(self.ends, lo, side="right"))
        while lo < hi and i < len(self.order):
            start = int(self.ends[i - 1]) if i else 0
            end = int(self.ends[i])
            units.append((int(self.order[i]), max(lo, start) - start, min(hi, end) - start))
            lo, i = min(hi, end), i + 1
        return units


def plan_epoch(left: np.ndarray, num_slots: int, batch_size: int, seed: int | None = None) -> EpochPlan:
    """`left[i]`: samples of shard i to plan (its count, or what is left of it). The shards with any,
    in a seeded order when `seed` is given, cut into `num_slots` contiguous ranges."""
    left = np.asarray(left, dtype=np.int64)
    order = np.flatnonzero(left > 0)
    if seed is not None:
        order = np.random.Generator(np.random.PCG64(seed)).permutation(order)
    return EpochPlan(order, np.cumsum(left[order]), num_slots, batch_size)


def slot_read_order(plan: EpochPlan, slot: int, seed: int, gen: int, epoch: int, pas: int) -> list[Unit]:
    """The order in which slot `slot` reads its ranges in pass `pas`: seeded, so that a resume, and the
    bookkeeping of a later layout (aimv2.data.loader), find the same order."""
    units = plan.slot_units(slot)
    random.Random(stable_seed(seed, gen, slot, epoch, pas, "order")).shuffle(units)
    return units


class Consumed:
    """Samples of an epoch consumed so far under earlier layouts, per shard (see the module doc)."""

    def __init__(self, counts: np.ndarray):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.full = np.zeros(len(self.counts), dtype=bool)  # every sample of the shard consumed
        self.partial: dict[int, np.ndarray] = {}  # shard -> bool bitmap of its samples (some consumed)

    def left_counts(self) -> np.ndarray:
        left = np.where(self.full, 0, self.counts)
        for shard, packed in self.partial.items():
            left[shard] -= int(self._bits(shard, packed).sum())
        return left

    def _bits(self, shard: int, packed: np.ndarray) -> np.ndarray:
        return np.unpackbits(packed, count=int(self.counts[shard])).view(bool)

    def done(self, shard: int, index: int) -> bool:
        """Whether sample `index` of `shard` (its position in the tar) was consumed."""
        if self.full[shard]:
            return index < self.counts[shard]
        packed = self.partial.get(shard)
        return packed is not None and index < self.counts[shard] and bool(packed[index >> 3] >> (7 - (index & 7)) & 1)

    def indices(self, shard: int, first: int, end: int) -> np.ndarray:
        """Tar positions of the samples of ranks [first, end) among the shard's unconsumed ones."""
        if self.full[shard]:
            return np.zeros(0, dtype=np.int64)
        packed = self.partial.get(shard)
        if packed is None:
            return np.arange(first, end, dtype=np.int64)
        return np.flatnonzero(~self._bits(shard, packed))[first:end]

    def add(self, shard: int, indices: np.ndarray) -> None:
        """Mark samples (tar positions) of `shard` consumed."""
        if self.full[shard] or len(indices) == 0:
            return
        count = int(self.counts[shard])
        packed = self.partial.get(shard)
        if packed is None and len(indices) == count and int(indices[0]) == 0 and int(indices[-1]) == count - 1:
            self.full[shard] = True  # the common case, a whole shard: no bitmap
            return
        bits = self._bits(shard, packed) if packed is not None else np.zeros(count, dtype=bool)
        bits[indices] = True
        if bits.all():
            self.full[shard] = True
            self.partial.pop(shard, None)
        else:
            self.partial[shard] = np.packbits(bits)  # a bit per sample of the few half-read shards

    def add_ranks(self, before: Consumed, shard: int, first: int, end: int) -> None:
        """Mark consumed the samples of ranks [first, end) among those `before` had left of `shard`."""
        whole = first == 0 and end == before.counts[shard] and not before.full[shard] and shard not in before.partial
        if whole and shard not in self.partial:
            self.full[shard] = True  # the common case, a whole untouched shard: no bitmap, no index array
        else:
            self.add(shard, before.indices(shard, first, end))

    def add_read(
        self,
        before: Consumed,
        units: list[Unit],
        count: int,
        segment_bits: np.ndarray | None = None,
        segment_start: int = 0,
    ) -> None:
        """Add what a slot consumed: the first `count` samples of its read order `units` (planned over
        `before`, the samples its plan left out), plus, where `segment_bits` is given, the samples
        segment_start + i of that order whose bit i is set (the consumed part of a shuffle segment)."""
        sizes = np.array([end - first for _, first, end in units], dtype=np.int64)
        ends = np.cumsum(sizes)
        whole = int(np.searchsorted(ends, count, side="right"))  # units [0, whole) lie inside the prefix
        for shard, first, end in units[:whole]:
            self.add_ranks(before, shard, first, end)
        if whole < len(units) and count > (ends[whole - 1] if whole else 0):
            shard, first, _ = units[whole]
            self.add_ranks(before, shard, first, first + count - int(ends[whole - 1] if whole else 0))
        if segment_bits is None or not segment_bits.any():
            return
        positions = segment_start + np.flatnonzero(segment_bits)  # (k,) positions in the read order
        unit_of = np.searchsorted(ends, positions, side="right")
        for u in np.unique(unit_of[unit_of < len(units)]):
            shard, first, end = units[int(u)]
            ranks = positions[unit_of == u] - (ends[u] - sizes[u])
            self.add(shard, before.indices(shard, first, end)[ranks])

    def copy(self) -> Consumed:
        out = Consumed(self.counts)
        out.full = self.full.copy()
        out.partial = {k: v.copy() for k, v in self.partial.items()}
        return out

    # -- in checkpoints: bits, not a value per sample ------------------------------------------
    def state(self) -> dict:
        """{"full": a bit per shard, "partial": the half-read shards, "bits": their packed bitmaps, each
        whole bytes, in that order}."""
        shards = sorted(self.partial)
        bits = np.concatenate([self.partial[s] for s in shards]) if shards else np.zeros(0, dtype=np.uint8)
        return {
            "full": torch.from_numpy(np.packbits(self.full)),
            "partial": torch.tensor(shards, dtype=torch.long),
            "bits": torch.from_numpy(bits),
        }

    @classmethod
    def from_state(cls, state: dict, counts: np.ndarray) -> Consumed:
        out = cls(counts)
        out.full = np.unpackbits(state["full"].numpy(), count=len(counts)).astype(bool)
        bits = state["bits"].numpy()
        offset = 0
        for shard in state["partial"].tolist():
            length = (int(counts[shard]) + 7) // 8
            out.partial[shard] = bits[offset : offset + length].copy()
            offset += length
        return out

    def nbytes(self) -> int:
        return self.full.nbytes + sum(b.nbytes for b in self.partial.values())
