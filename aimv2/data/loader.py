"""The DataLoader of a ShardStream: tells the stream which epoch starts, and remembers where every
worker's stream stands so that a checkpoint can continue it exactly.

Its `position_state()` goes into every checkpoint through the DataModule's `state_dict` (Lightning
restores DataModules before any data is requested; its stateful-loader path is restored too late
when `estimated_stepping_batches` builds the loader early). Positions advance only through
`mark_consumed`, called once a training step has finished with a batch
(aimv2.engine.stream_state), never when a batch is merely prefetched.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)
STATE_VERSION = 1


class EpochAwareLoader(DataLoader):
    """`epoch_fn` gives the epoch at each iteration (default: count iterations); `gather` stacks one
    tensor per rank (world, ...) so rank 0 can save every rank's positions."""

    def __init__(self, dataset, *, epoch_fn: Optional[Callable[[], int]] = None,
                 gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, **kwargs):
        kwargs.setdefault("persistent_workers", False)  # workers must copy the stream after start_iteration
        super().__init__(dataset, batch_size=None, **kwargs)
        self._epoch_fn, self._gather = epoch_fn, gather
        self._next_epoch = 0
        self._pending: Optional[dict] = None  # a saved position, applied when its epoch starts
        self.epoch, self.consumed, self.slots = 0, 0, {}

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
        self.slots = dict(resume["slots"]) if resume else {}
        if resume:
            log.info("data stream of rank %d continues epoch %d after %d batches", self.dataset.rank, epoch,
                     self.consumed)
        self.dataset.start_iteration(epoch, resume)
        return super().__iter__()

    def set_epoch(self, epoch: int) -> None:
        """The next iteration is epoch `epoch`, the ones after count on from it. A job that keeps its own
        progress (the augmented probe's heads.pt) resumes the stream here: the shuffle is seeded by the
        epoch, so a resumed epoch k draws epoch k's order, not epoch 0's again."""
        if self._epoch_fn is not None:
            raise ValueError("this loader takes its epoch from epoch_fn; set_epoch would be ignored")
        self._next_epoch = int(epoch)

    def mark_consumed(self, stream_pos: list[int]) -> None:
        """A training step has finished with the batch tagged `stream_pos` = [worker, *position]."""
        self.consumed += 1
        self.slots[int(stream_pos[0])] = tuple(int(v) for v in stream_pos[1:])

    # -- saved in checkpoints ----------------------------------------------------------------
    def position_state(self) -> dict:
        """Every rank's positions (a collective call under DDP: all ranks save together)."""
        stream = self.dataset
        table = torch.full((stream.workers_per_rank, stream.position_width + 1), -1, dtype=torch.long)
        for worker, pos in self.slots.items():
            table[worker, 1:] = torch.tensor(pos, dtype=torch.long)
        table[:, 0] = self.consumed
        gathered = self._gather(table) if self._gather is not None else table[None]
        consumed = sorted({int(c) for c in gathered[:, 0, 0]})
        if len(consumed) > 1:
            log.warning("ranks consumed different batch counts this epoch: %s", consumed)
        slots = [[row[1:].tolist() if row[1] >= 0 else None for row in rank] for rank in gathered]
        return {"version": STATE_VERSION, "layout": stream.layout(), "gen": stream.gen,
                "epoch": self.epoch, "consumed": consumed[0], "slots": slots}

    def load_position_state(self, state: dict) -> None:
        stream = self.dataset
        if state.get("version") != STATE_VERSION or state.get("layout") != stream.layout():
            stream.gen = int(state.get("gen", 0)) + 1
            log.warning("the data layout changed since the checkpoint (%s -> %s): the stream cannot continue "
                        "exactly and starts a fresh sequence for this epoch", state.get("layout"), stream.layout())
            return
        stream.gen = int(state["gen"])
        mine = state["slots"][stream.rank]
        self._pending = {"epoch": int(state["epoch"]), "consumed": int(state["consumed"]),
                         "slots": {w: tuple(pos) for w, pos in enumerate(mine) if pos is not None}}
        if self._epoch_fn is None:
            self._next_epoch = self._pending["epoch"]


class _StartOnFirstBatch:
    def __init__(self, start: Callable):
        self._start, self._iterator = start, None

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = self._start()
        return next(self._iterator)
