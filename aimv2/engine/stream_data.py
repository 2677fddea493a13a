"""The data module base of every job that trains on a `ShardStream` (pre-training, compressor
alignment): its training stream continues exactly where a checkpoint left it.

The loader (aimv2.data.loader) knows where every worker's stream stands; its positions go into every
checkpoint through the data module's `state_dict` (Lightning restores data modules before any data is
requested; its stateful-loader path comes too late when `estimated_stepping_batches` builds the
loader early) and are handed back to the loader before its first batch. Positions advance only for
batches a training step has finished with (aimv2.engine.stream_state.StreamPosition, installed by
`build_trainer`), so a resumed run sees exactly the batches the uninterrupted one would have.

Shard metadata is read by one process: in a multi-process run rank 0 resolves the sources (their
manifests, or a stats file per shard where there is none) and broadcasts the tables, so the other
ranks open no metadata file at start (a requeued 256-rank job would otherwise repeat every read 256
times); an error there reaches every rank as the same one-line UserError.
"""

from __future__ import annotations

import lightning as L
import torch

from aimv2.data.stream import EpochAwareLoader, ShardStream
from aimv2.errors import UserError


class StreamDataModule(L.LightningDataModule):
    """Subclasses build their stream in `build_stream(rank, world_size)` from the sources `resolve_sources()`
    returns (called on one process, see the module doc); `num_workers` loader workers; `on_change`: what a
    resume over changed data does (aimv2.data.loader)."""

    def __init__(self, num_workers: int, on_change: str = "error"):
        super().__init__()
        self.num_workers, self.on_change = num_workers, on_change
        self.sources: list | None = None
        self.stream: ShardStream | None = None
        self.loader: EpochAwareLoader | None = None
        self._position: dict | None = None  # a restored stream position, for the loader to come

    def resolve_sources(self) -> list:
        """The stream's sources with their shard tables (aimv2.data.shardlist.resolve_shards)."""
        raise NotImplementedError

    def build_stream(self, rank: int = 0, world_size: int = 1) -> ShardStream:
        raise NotImplementedError

    def resolved_sources(self) -> list:
        """The sources with their shard tables: those `setup` resolved, else resolved now in this process (a
        single-process caller of `build_stream`)."""
        if self.sources is None:
            self.sources = self.resolve_sources()
        return self.sources

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if self.sources is None:
            self.sources = self._on_rank_zero(self.resolve_sources) if world > 1 else self.resolve_sources()
        self.stream = self.build_stream(rank, world)

    def _on_rank_zero(self, fn):
        """fn() on rank 0, its result (or its UserError) broadcast to every rank."""
        strategy = self.trainer.strategy
        result = None
        if self.trainer.global_rank == 0:
            try:
                result = ("ok", fn())
            except UserError as err:
                result = ("error", str(err))
        kind, value = strategy.broadcast(result, src=0)
        if kind == "error":
            raise UserError(value)
        return value

    def train_dataloader(self) -> EpochAwareLoader:
        trainer = self.trainer
        self.loader = EpochAwareLoader(self.stream, num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                                       epoch_fn=(lambda: trainer.current_epoch) if trainer is not None else None,
                                       gather=self._gather if trainer is not None else None, on_change=self.on_change)
        if self._position is not None:
            self.loader.load_position_state(self._position)
            self._position = None
        return self.loader

    # -- where the stream stands, in every checkpoint (exact resume) -------------------------
    def state_dict(self) -> dict:
        return {"stream": self.loader.position_state()} if self.loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Called by Lightning on resume, before the loader exists (or before its first batch)."""
        if "stream" not in state:
            return
        if self.loader is not None:
            self.loader.load_position_state(state["stream"])
        else:
            self._position = state["stream"]

    def _gather(self, table: torch.Tensor) -> torch.Tensor:
        """(world, ...) from every rank's `table`; a collective, called by all ranks at checkpoint time."""
        strategy = self.trainer.strategy
        if self.trainer.world_size == 1:
            return table[None]
        return strategy.all_gather(table.to(strategy.root_device)).cpu()
