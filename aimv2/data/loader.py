"""The DataLoader of a ShardStream: tells the stream which epoch starts, and remembers where every
worker's stream stands so that a checkpoint can continue it exactly.

Its `position_state()` goes into every checkpoint through the DataModule's `state_dict` (Lightning
restores DataModules before any data is requested; its stateful-loader path is restored too late
when `estimated_stepping_batches` builds the loader early). Positions advance only through
`mark_consumed`, called once a training step has finished with a batch
(aimv2.engine.stream_state), never when a batch is merely prefetched.

Positions are kept per lane (a seeded sample sequence; aimv2.data.stream). Resumed under the same
layout, every lane continues exactly. Under another one (ranks, workers, batch per rank):
- epoch mode: the loader also keeps the epoch's ledger, the ids of the samples trained on or passed
  over (corrupt), which a checkpoint stores as the union over ranks; the stream plans the rest of
  the epoch over the samples the ledger does not hold: each sample still once per epoch. The ledger
  also tells repeats (a refill pass after corrupt samples) apart.
- resampled mode: the lanes continue their seeded draws from where they stood, spread over the new
  slots (a slot runs several in turn); more slots than lanes add fresh lanes.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from aimv2.data.workers import ignore_stop_signals, worker_context

log = logging.getLogger(__name__)
STATE_VERSION = 2  # 2: the epoch ledger and repeat counts (1, positions only, still continues)


class EpochAwareLoader(DataLoader):
    """`epoch_fn` gives the epoch at each iteration (default: count iterations); `gather` stacks one
    tensor per rank (world, ...) so rank 0 can save every rank's positions."""

    def __init__(self, dataset, *, epoch_fn: Optional[Callable[[], int]] = None,
                 gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, **kwargs):
        kwargs.setdefault("persistent_workers", False)  # workers must copy the stream after start_iteration
        kwargs.setdefault("multiprocessing_context", worker_context(kwargs.get("num_workers", 0), dataset))
        kwargs.setdefault("worker_init_fn", ignore_stop_signals)
        super().__init__(dataset, batch_size=None, **kwargs)
        self._epoch_fn, self._gather = epoch_fn, gather
        self._next_epoch = 0
        self._pending: Optional[dict] = None  # a saved position, applied when its epoch starts
        self.epoch, self.consumed, self.lanes = 0, 0, {}  # lanes: {lane: position after its last consumed batch}
        self.ledger: Optional[np.ndarray] = None  # epoch mode: ids trained on or passed over this epoch
        self.corrupt: Optional[np.ndarray] = None  # epoch mode: ids found corrupt so far; later epochs leave them out
        self.repeated = 0  # samples this rank trained on a second time within their epoch, over the run

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
        self.lanes = dict(resume["lanes"]) if resume else {}
        fresh = np.zeros(self.dataset.total, dtype=bool) if self.dataset.plan is not None else None
        self.ledger = resume["ledger"].copy() if resume and resume.get("ledger") is not None else fresh
        if self.corrupt is None and fresh is not None:
            self.corrupt = fresh.copy()
        if resume:
            log.info("data stream of rank %d continues epoch %d after %d batches", self.dataset.rank, epoch,
                     self.consumed)
        elif self.corrupt is not None and self.corrupt.any():
            # a new epoch is planned without the samples earlier epochs found corrupt: no slot falls short
            resume = {"consumed": 0, "lanes": {}, "base": self.corrupt.copy()}
        self.dataset.start_iteration(epoch, resume)
        return super().__iter__()

    def set_epoch(self, epoch: int) -> None:
        """The next iteration is epoch `epoch`, the ones after count on from it. A job that keeps its own
        progress (the augmented probe's heads.pt) resumes the stream here: the shuffle is seeded by the
        epoch, so a resumed epoch k draws epoch k's order, not epoch 0's again."""
        if self._epoch_fn is not None:
            raise ValueError("this loader takes its epoch from epoch_fn; set_epoch would be ignored")
        self._next_epoch = int(epoch)

    def mark_consumed(self, stream_pos: list[int], ids: Optional[list] = None,
                      skipped_ids: Optional[list] = None) -> int:
        """A training step has finished with the batch tagged `stream_pos` = [lane, *position], whose
        samples had `ids` (and passed over the corrupt `skipped_ids`). Returns how many of its samples
        this epoch had trained on already (repeats of a refill pass)."""
        self.consumed += 1
        self.lanes[int(stream_pos[0])] = tuple(int(v) for v in stream_pos[1:])
        if self.ledger is None or ids is None:
            return 0
        trained = np.asarray([int(i) for i in ids if int(i) >= 0], dtype=np.int64)
        unique, counts = np.unique(trained, return_counts=True)
        repeated = int((counts - 1).sum() + self.ledger[unique].sum())
        self.ledger[unique] = True
        passed = [int(i) for i in skipped_ids or () if int(i) >= 0]
        self.ledger[passed] = True
        self.corrupt[passed] = True
        self.repeated += repeated
        return repeated

    # -- saved in checkpoints ----------------------------------------------------------------
    def position_state(self) -> dict:
        """Every rank's positions, repeat counts and the union of their ledgers (collective calls under
        DDP: all ranks save together)."""
        stream = self.dataset
        table = torch.full((stream.lanes, stream.position_width + 2), -1, dtype=torch.long)  # a row per lane,
        for lane, pos in self.lanes.items():                                                # on every rank
            table[lane, 2:] = torch.tensor(pos, dtype=torch.long)
        table[:, 0], table[:, 1] = self.consumed, self.repeated
        gathered = self._all(table)
        consumed = sorted({int(c) for c in gathered[:, 0, 0]})
        if len(consumed) > 1:
            log.warning("ranks consumed different batch counts this epoch: %s", consumed)
        positions = {lane: row[2:].tolist() for rank in gathered for lane, row in enumerate(rank) if row[2] >= 0}
        ledger = corrupt = None
        if self.ledger is not None:  # one all-gather for both bit sets, OR-ed over ranks
            both = np.bitwise_or.reduce(self._all(torch.stack([_pack(self.ledger), _pack(self.corrupt)])).numpy(), 0)
            ledger, corrupt = torch.from_numpy(both[0]), torch.from_numpy(both[1])
        return {"version": STATE_VERSION, "layout": stream.layout(), "data": data_fingerprint(stream),
                "gen": stream.gen, "epoch": self.epoch, "consumed": consumed[0], "lanes": positions,
                "repeated": [int(rank[0, 1]) for rank in gathered], "ledger": ledger, "corrupt": corrupt,
                "base": _pack(stream.base) if stream.base is not None else None}

    def _all(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._gather(tensor) if self._gather is not None else tensor[None]

    def load_position_state(self, state: dict) -> None:
        stream = self.dataset
        version, epoch = state.get("version"), int(state.get("epoch", 0))
        ledger = _unpack(state.get("ledger"), stream)
        self.corrupt = _unpack(state.get("corrupt"), stream)
        same_data = version == STATE_VERSION and state.get("data") == data_fingerprint(stream)
        if same_data and stream.plan is None and state["layout"]["mode"] == "resampled":
            # a resampled run keeps the lanes it has ever had (a run resumed on fewer slots runs several per slot)
            stream.lanes = max(int(state["layout"]["lanes"]), stream.world_size * stream.workers_per_rank)
        if same_data and state.get("layout") == stream.layout():
            stream.gen = int(state["gen"])
            self.repeated = int(state["repeated"][stream.rank])
            self._pending = {"epoch": epoch, "consumed": int(state["consumed"]), "ledger": ledger,
                             "base": _unpack(state.get("base"), stream), "lanes": _lanes(state)}
        elif same_data and stream.plan is not None and ledger is not None:
            self._resume_elsewhere(state, ledger)
        elif same_data and stream.plan is None and state["layout"]["mode"] == "resampled":
            self._continue_lanes(state)
        else:
            stream.gen = int(state.get("gen", 0)) + 1
            why = ("it was saved by an older version of the stream" if version != STATE_VERSION else
                   "the data (sources, shard counts) or the mode changed")
            log.warning("the data stream cannot continue the checkpoint's (%s) and starts a fresh sequence for this "
                        "epoch (%s -> %s)", why, state.get("layout"), stream.layout())
            return
        if self._epoch_fn is None:
            self._next_epoch = self._pending["epoch"]

    def _resume_elsewhere(self, state: dict, ledger: np.ndarray) -> None:
        """An epoch-mode checkpoint of another layout: the rest of its epoch is planned over the samples
        its ledger does not hold, for this layout."""
        stream, old = self.dataset, state["layout"]
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        base = ledger | self.corrupt if self.corrupt is not None else ledger  # seen, or known to be corrupt
        plan = stream.plan_for(epoch, base)
        slots = stream.world_size * stream.workers_per_rank
        left = stream.total - int(base.sum())
        stream.gen = int(state["gen"])
        stream.resumed_len = consumed + plan.batches_per_slot * stream.workers_per_rank
        self.repeated = sum(state.get("repeated", [])) if stream.rank == 0 else 0  # summed over ranks when logged
        self._pending = {"epoch": epoch, "consumed": consumed, "lanes": {}, "ledger": ledger, "base": base}
        log.warning(
            "resuming epoch %d under another data layout (ranks x workers x batch: %d x %d x %d -> %d x %d x %d): "
            "%d of %d samples already seen this epoch (or known corrupt); the other %d are planned as %d batches "
            "per data slot (%d samples left over: the drop-last remainder)", epoch, old["world_size"], old["workers"],
            old["batch_size"], stream.world_size, stream.workers_per_rank, stream.batch_size, stream.total - left,
            stream.total, left, plan.batches_per_slot, left - plan.batches_per_slot * slots * stream.batch_size)
        _warn_step_size(old, stream, "every sample is still seen once this epoch")

    def _continue_lanes(self, state: dict) -> None:
        """A resampled checkpoint of another layout: its lanes continue their draws on this layout's
        slots; slots beyond its lanes start fresh lanes."""
        stream, old = self.dataset, state["layout"]
        saved = _lanes(state)
        slots = stream.world_size * stream.workers_per_rank
        stream.gen = int(state["gen"])
        self.repeated = 0
        self._pending = {"epoch": int(state["epoch"]), "consumed": int(state["consumed"]), "ledger": None,
                         "base": None, "lanes": saved}
        log.warning("resuming the resampled stream under another data layout (ranks x workers x batch: %d x %d x %d "
                    "-> %d x %d x %d): its %d lanes continue their seeded draws on %d data slots%s",
                    old["world_size"], old["workers"], old["batch_size"], stream.world_size, stream.workers_per_rank,
                    stream.batch_size, int(old["lanes"]), slots,
                    f", and {slots - int(old['lanes'])} new lanes start" if slots > int(old["lanes"]) else "")
        _warn_step_size(old, stream, "the draws continue")


def _warn_step_size(old: dict, stream, still: str) -> None:
    before, after = old["world_size"] * old["batch_size"], stream.world_size * stream.batch_size
    if before != after:
        log.warning("samples per step change from %d to %d (ranks x data.batch_size): %s, but steps (and the "
                    "step-based learning-rate schedule) now stand for %s data; keep ranks x data.batch_size at %d "
                    "to keep the recipe", before, after, still, "more" if after > before else "less", before)


def _lanes(state: dict) -> dict[int, tuple]:
    return {int(lane): tuple(pos) for lane, pos in state["lanes"].items()}


def data_fingerprint(stream) -> str:
    """What sample ids and shard draws depend on: the sources' names, weights and their shards' counts,
    not their paths (a requeued job may see the same shards elsewhere)."""
    parts = [[src.name, src.weight, [s.count for s in src.shards]] for src in stream.sources]
    return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()


def _pack(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask))


def _unpack(packed: Optional[torch.Tensor], stream) -> Optional[np.ndarray]:
    if packed is None or stream.plan is None:
        return None
    return np.unpackbits(packed.numpy(), count=stream.total).astype(bool)


class _StartOnFirstBatch:
    def __init__(self, start: Callable):
        self._start, self._iterator = start, None

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = self._start()
        return next(self._iterator)
