"""The DataLoader of a ShardStream: tells the stream which epoch starts, and remembers where every
worker's stream stands so that a checkpoint can continue it exactly.

Its `position_state()` goes into every checkpoint through the DataModule's `state_dict` (Lightning
restores DataModules before any data is requested; its stateful-loader path is restored too late
when `estimated_stepping_batches` builds the loader early). Positions advance only through
`mark_consumed`, called once a training step has finished with a batch
(aimv2.engine.stream_resume), never when a batch is merely prefetched.

The state holds nothing per sample, so it stays the same size at any epoch length (benchmarks/scale.py
measures it at 3.5B samples, 256 ranks x 8 workers): per lane (a seeded sample sequence; aimv2.data.stream)
its position, and in epoch mode the bits of the shuffle segment it stands in; per epoch the samples
consumed under earlier layouts, per shard (aimv2.data.epoch_plan.Consumed); the data's identity, a
digest per shard. One all-gather per checkpoint, of one table of this rank's lanes.

Resumed under the same layout, every lane continues exactly. Under another one (ranks, workers, batch
per rank):
- epoch mode: what each lane consumed follows from its position; the stream plans the rest of the
  epoch over the samples left: each sample still once per epoch.
- resampled mode: the lanes continue their seeded draws from where they stood, spread over the new
  slots (a slot runs several in turn); more slots than lanes add fresh lanes.
Resumed over other data (a shard renamed, resized, recounted, added or removed: the epoch's sample ids
would point at other samples) it stops with a one-line error naming the shard, unless the run says
`data.on_change=restart`: the epoch then starts afresh on the new data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from aimv2.data.epoch_plan import Consumed, plan_epoch, slot_read_order
from aimv2.data.readers import stable_seed
from aimv2.data.workers import ignore_stop_signals, worker_context
from aimv2.errors import UserError

log = logging.getLogger(__name__)
STATE_VERSION = 3  # 3: positions and segment bits, nothing per sample (2 kept a bit per sample of the epoch)
ON_CHANGE = ("error", "restart")


class EpochAwareLoader(DataLoader):
    """`epoch_fn` gives the epoch at each iteration (default: count iterations); `gather` stacks one
    tensor per rank (world, ...) so every rank can save every rank's positions; `on_change` says what a
    resume over changed data does ("error" or "restart")."""

    def __init__(
        self,
        dataset,
        *,
        epoch_fn: Callable[[], int] | None = None,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        on_change: str = "error",
        **kwargs,
    ):
        kwargs.setdefault("persistent_workers", False)  # workers must copy the stream after start_iteration
        kwargs.setdefault("multiprocessing_context", worker_context(kwargs.get("num_workers", 0), dataset))
        kwargs.setdefault("worker_init_fn", ignore_stop_signals)
        super().__init__(dataset, batch_size=None, **kwargs)
        if on_change not in ON_CHANGE:
            raise UserError(f"data.on_change: must be 'error' or 'restart', got {on_change!r}")
        self._epoch_fn, self._gather, self.on_change = epoch_fn, gather, on_change
        self._next_epoch = 0
        self._pending: dict | None = None  # a saved position, applied when its epoch starts
        self.epoch, self.consumed, self.lanes = 0, 0, {}  # lanes: {lane: position after its last consumed batch}
        self.base: Consumed | None = None  # epoch mode: samples consumed under earlier layouts this epoch
        self.base_consumed = 0  # batches this rank consumed this epoch before `base` was planned around
        self.repeated = 0  # samples this rank trained on a second time within their epoch, over the run
        self._plan_cache: tuple | None = None
        self._identity: dict | None = None

    def __iter__(self):
        # Started at the first batch, not here: Lightning creates the epoch's iterator before a restarted
        # run has settled which epoch it is in (a checkpoint from an epoch's last batch starts the next).
        return _StartOnFirstBatch(self._start)

    def _start(self):
        epoch = self._epoch_fn() if self._epoch_fn is not None else self._next_epoch
        resume = self._pending if self._pending is not None and self._pending["epoch"] == epoch else None
        self._pending, self._next_epoch = None, epoch + 1
        self.epoch = epoch
        self.consumed = resume["consumed"] if resume else 0
        own = set(self.dataset.rank_lanes())  # a state holds every rank's lanes; this rank saves its own
        self.lanes = {lane: pos for lane, pos in resume["lanes"].items() if lane in own} if resume else {}
        self.base = resume["base"] if resume else None
        self.base_consumed = resume["base_consumed"] if resume else 0
        if resume:
            log.info(
                "data stream of rank %d continues epoch %d after %d batches", self.dataset.rank, epoch, self.consumed
            )
        self.dataset.start_iteration(
            epoch, {"consumed": self.consumed, "lanes": self.lanes, "base": self.base} if resume else None
        )
        return super().__iter__()

    def set_epoch(self, epoch: int) -> None:
        """The next iteration is epoch `epoch`, the ones after count on from it. A job that keeps its own
        progress (the augmented probe's heads.pt) resumes the stream here: the shuffle is seeded by the
        epoch, so a resumed epoch k draws epoch k's order, not epoch 0's again."""
        if self._epoch_fn is not None:
            raise ValueError("this loader takes its epoch from epoch_fn; set_epoch would be ignored")
        self._next_epoch = int(epoch)

    def mark_consumed(self, stream_pos: list[int], repeated: int = 0) -> None:
        """A training step has finished with the batch tagged `stream_pos` = [lane, *position], which
        held `repeated` samples trained a second time this epoch (a refill pass)."""
        self.consumed += 1
        self.lanes[int(stream_pos[0])] = tuple(int(v) for v in stream_pos[1:])
        self.repeated += int(repeated)

    # -- saved in checkpoints ----------------------------------------------------------------
    def position_state(self) -> dict:
        """Every rank's positions and repeat counts (a collective under DDP: all ranks save together)."""
        stream = self.dataset
        rows, words = self._rows_per_rank(), self._segment_words()
        table = torch.full((rows, 3 + stream.position_width + words), -1, dtype=torch.long)
        plan = self._plan() if stream.mode == "epoch" else None
        for row, (lane, pos) in enumerate(sorted(self.lanes.items())):
            table[row, 0], table[row, 3 : 3 + len(pos)] = lane, torch.tensor(pos, dtype=torch.long)
            if plan is not None and (bits := stream.segment_bits(plan, lane, pos)) is not None:
                table[row, 3 + stream.position_width :] = _bits_to_words(bits, words)
        table[:, 1], table[:, 2] = self.consumed, self.repeated
        gathered = self._all(table)  # (world, rows, columns)
        consumed = sorted({int(c) for c in gathered[:, 0, 1]})
        if len(consumed) > 1:
            log.warning("ranks consumed different batch counts this epoch: %s", consumed)
        rows = gathered.flatten(0, 1)
        rows = rows[rows[:, 0] >= 0]
        rows = rows[rows[:, 0].argsort()]  # one row per lane that has a position, by lane
        width = stream.position_width
        # tables, not dicts of lists: the same bytes whatever the positions' values (steps, samples)
        return {
            "version": STATE_VERSION,
            "layout": stream.layout(),
            "data": self.identity(),
            "gen": stream.gen,
            "epoch": self.epoch,
            "consumed": consumed[0],
            "lanes": rows[:, [0, *range(3, 3 + width)]].clone(),
            "segments": rows[:, 3 + width :].clone(),
            "repeated": [int(rank[0, 2]) for rank in gathered],
            "base": self.base.state() if self.base is not None else None,
            "base_consumed": self.base_consumed,
        }

    def _rows_per_rank(self) -> int:
        """Lanes a rank runs at most: its slots, each running ceil(lanes / slots) lanes at most."""
        stream = self.dataset
        return stream.workers_per_rank * math.ceil(stream.lanes / stream.num_slots)

    def _segment_words(self) -> int:
        return math.ceil(self.dataset.segment / 64) if self.dataset.mode == "epoch" else 0

    def _plan(self):
        key = (self.epoch, id(self.base))
        if self._plan_cache is None or self._plan_cache[0] != key:
            self._plan_cache = (key, self.dataset.plan_for(self.epoch, self.base))
        return self._plan_cache[1]

    def identity(self) -> dict:
        """What the epoch's sample ids and the shard draws depend on: each source's name, weight and
        shard count, and a digest of every shard's file name, byte size and sample count."""
        if self._identity is None:
            stream = self.dataset
            digests = np.concatenate([s.shards.digests() for s in stream.sources] or [np.zeros(0, np.uint64)])
            self._identity = {
                "sources": [[s.name, s.weight, len(s.shards)] for s in stream.sources],
                "shards": torch.from_numpy(digests.astype(np.uint64).view(np.int64)),
            }
        return self._identity

    def _all(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._gather(tensor) if self._gather is not None else tensor[None]

    def load_position_state(self, state: dict) -> None:
        stream = self.dataset
        version, epoch = state.get("version"), int(state.get("epoch", 0))
        if version != STATE_VERSION:
            self._data_changed(
                state,
                f"the checkpoint's data-stream state is version {version}, this aimv2 reads "
                f"version {STATE_VERSION} (saved by another release)",
            )
            return
        change = self._data_change(state["data"])
        if change:
            self._data_changed(state, change)
            return
        layout = state["layout"]
        if stream.mode == "resampled" and layout["mode"] == "resampled":
            # a resampled run keeps the lanes it has ever had (a run resumed on fewer slots runs several per slot)
            stream.lanes = max(int(layout["lanes"]), stream.num_slots)
        if layout == stream.layout():
            stream.gen = int(state["gen"])
            self.repeated = int(state["repeated"][stream.rank])
            base = Consumed.from_state(state["base"], stream.shards.counts) if state.get("base") is not None else None
            self._pending = {
                "epoch": epoch,
                "consumed": int(state["consumed"]),
                "lanes": saved_lanes(state),
                "base": base,
                "base_consumed": int(state.get("base_consumed", 0)),
            }
            if base is not None:  # an epoch resumed elsewhere before: its length, on every later resume too
                stream.resumed_len = self._pending["base_consumed"] + self._batches_left(epoch, base)
        elif stream.mode == "epoch" and layout["mode"] == "epoch":
            self._resume_elsewhere(state)
        elif stream.mode == "resampled" and layout["mode"] == "resampled":
            self._continue_lanes(state)
        else:
            self._data_changed(state, f"the data mode changed from {layout['mode']} to {stream.mode}")
            return
        if self._epoch_fn is None:
            self._next_epoch = self._pending["epoch"]

    def _batches_left(self, epoch: int, base: Consumed) -> int:
        stream = self.dataset
        return stream.plan_for(epoch, base).batches_per_slot * stream.workers_per_rank

    def _data_change(self, saved: dict) -> str:
        """'' when the data is the checkpoint's, else a sentence naming what changed (the first shard)."""
        stream, now = self.dataset, self.identity()
        if saved["sources"] != now["sources"]:
            return f"the sources (name, weight, number of shards) changed from {saved['sources']} to {now['sources']}"
        old, new = saved["shards"].numpy(), now["shards"].numpy()
        differ = np.flatnonzero(old != new)
        if not len(differ):
            return ""
        return (
            f"shard {stream.shards.url(int(differ[0]))} is not the one the checkpoint was trained on (its file name, "
            f"byte size or sample count differs; {len(differ)} shard(s) differ in all)"
        )

    def _data_changed(self, state: dict, why: str) -> None:
        """Refuse, or with data.on_change=restart start the epoch afresh on the data there is now."""
        if self.on_change != "restart":
            raise UserError(
                f"cannot resume the data stream: {why}; restore the data, or set data.on_change=restart "
                "to start a new epoch on the data as it is now"
            )
        stream = self.dataset
        stream.gen = int(state.get("gen", 0)) + 1
        epoch, consumed = int(state.get("epoch", 0)), int(state.get("consumed", 0))
        self._pending = {"epoch": epoch, "consumed": 0, "lanes": {}, "base": None, "base_consumed": 0}
        if stream.mode == "epoch":  # the rest of Lightning's epoch is a whole epoch of the new data
            stream.resumed_len = consumed + stream.full_batches * stream.workers_per_rank
        log.warning("data.on_change=restart: %s; the data stream starts a new sequence for epoch %d", why, epoch)
        if self._epoch_fn is None:
            self._next_epoch = epoch

    def _resume_elsewhere(self, state: dict) -> None:
        """An epoch-mode checkpoint of another layout: what each of its lanes consumed follows from its
        position and segment bits; the rest of its epoch is planned over what is left, for this layout."""
        stream, old = self.dataset, state["layout"]
        epoch, consumed, gen = int(state["epoch"]), int(state["consumed"]), int(state["gen"])
        before = (
            Consumed.from_state(state["base"], stream.shards.counts)
            if state.get("base") is not None
            else Consumed(stream.shards.counts)
        )
        old_slots = old["world_size"] * old["workers"]
        old_plan = plan_epoch(
            before.left_counts(), old_slots, old["batch_size"], seed=stable_seed(old["seed"], gen, epoch, "order")
        )
        base = before.copy()
        segments = dict(zip(state["lanes"][:, 0].tolist(), state["segments"]))
        for lane, pos in saved_lanes(state).items():  # pos: (pass, segment, taken, produced, ...)
            units = slot_read_order(old_plan, lane, old["seed"], gen, epoch, 0)
            if pos[0] > 0:  # a refill pass: the lane's whole range was read
                base.add_read(before, units, old_plan.slot_size(lane))
                continue
            start = pos[1] * old["segment"]  # the first `segment` x seg samples of its read order
            bits = _words_to_bits(segments[lane], min(old["segment"], old_plan.slot_size(lane) - start))
            base.add_read(before, units, start, bits, start)
        stream.gen = gen
        plan = stream.plan_for(epoch, base)
        stream.resumed_len = consumed + plan.batches_per_slot * stream.workers_per_rank
        self.repeated = sum(state.get("repeated", [])) if stream.rank == 0 else 0  # summed over ranks when logged
        self._pending = {"epoch": epoch, "consumed": consumed, "lanes": {}, "base": base, "base_consumed": consumed}
        left, slots = plan.total, stream.num_slots
        log.warning(
            "resuming epoch %d under another data layout (ranks x workers x batch: %d x %d x %d -> %d x %d x %d): "
            "%d of %d samples already seen this epoch; the other %d are planned as %d batches per data slot "
            "(%d samples left over: the drop-last remainder)",
            epoch,
            old["world_size"],
            old["workers"],
            old["batch_size"],
            stream.world_size,
            stream.workers_per_rank,
            stream.batch_size,
            stream.total - left,
            stream.total,
            left,
            plan.batches_per_slot,
            left - plan.batches_per_slot * slots * stream.batch_size,
        )
        _warn_step_size(old, stream, "every sample is still seen once this epoch")

    def _continue_lanes(self, state: dict) -> None:
        """A resampled checkpoint of another layout: its lanes continue their draws on this layout's
        slots; slots beyond its lanes start fresh lanes."""
        stream, old = self.dataset, state["layout"]
        saved = saved_lanes(state)
        slots = stream.num_slots
        stream.gen = int(state["gen"])
        self.repeated = 0
        self._pending = {
            "epoch": int(state["epoch"]),
            "consumed": int(state["consumed"]),
            "base": None,
            "base_consumed": 0,
            "lanes": saved,
        }
        log.warning(
            "resuming the resampled stream under another data layout (ranks x workers x batch: %d x %d x %d "
            "-> %d x %d x %d): its %d lanes continue their seeded draws on %d data slots%s",
            old["world_size"],
            old["workers"],
            old["batch_size"],
            stream.world_size,
            stream.workers_per_rank,
            stream.batch_size,
            int(old["lanes"]),
            slots,
            f", and {slots - int(old['lanes'])} new lanes start" if slots > int(old["lanes"]) else "",
        )
        _warn_step_size(old, stream, "the draws continue")


def _warn_step_size(old: dict, stream, still: str) -> None:
    before, after = old["world_size"] * old["batch_size"], stream.world_size * stream.batch_size
    if before != after:
        log.warning(
            "samples per step change from %d to %d (ranks x data.batch_size): %s, but steps (and the "
            "step-based learning-rate schedule) now stand for %s data; keep ranks x data.batch_size at %d "
            "to keep the recipe",
            before,
            after,
            still,
            "more" if after > before else "less",
            before,
        )


def saved_lanes(state: dict) -> dict[int, tuple]:
    """{lane: its position} of a saved state (`position_state()["lanes"]`: a row per lane, lane first)."""
    return {int(row[0]): tuple(row[1:]) for row in state["lanes"].tolist()}


def _bits_to_words(bits: np.ndarray, words: int) -> torch.Tensor:
    packed = np.zeros(words * 8, dtype=np.uint8)
    data = np.packbits(bits)
    packed[: len(data)] = data
    return torch.from_numpy(packed.view(np.int64).copy())


def _words_to_bits(words: torch.Tensor, length: int) -> np.ndarray:
    return np.unpackbits(words.numpy().view(np.uint8), count=max(0, length)).astype(bool)


class _StartOnFirstBatch:
    def __init__(self, start: Callable):
        self._start, self._iterator = start, None

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = self._start()
        return next(self._iterator)
