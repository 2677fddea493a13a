"""The data module base of every job that trains on a `ShardStream` (pre-training, compressor
alignment): its training stream continues exactly where a checkpoint left it.

The loader (aimv2.data.loader) knows where every worker's stream stands; its positions go into every
checkpoint through the data module's `state_dict` (Lightning restores data modules before any data is
requested; its stateful-loader path comes too late when `estimated_stepping_batches` builds the
loader early) and are handed back to the loader before its first batch. Positions advance only for
batches a training step has finished with (aimv2.engine.stream_state.StreamPosition, installed by
`build_trainer`), so a resumed run sees exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import lightning as L
import torch

from aimv2.data.stream import EpochAwareLoader, ShardStream


class StreamDataModule(L.LightningDataModule):
    """Subclasses build their stream in `build_stream(rank, world_size)`; `num_workers` loader workers."""

    def __init__(self, num_workers: int):
        super().__init__()
        self.num_workers = num_workers
        self.stream: ShardStream | None = None
        self.loader: EpochAwareLoader | None = None
        self._position: dict | None = None  # a restored stream position, for the loader to come

    def build_stream(self, rank: int = 0, world_size: int = 1) -> ShardStream:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.stream = self.build_stream(rank, world)

    def train_dataloader(self) -> EpochAwareLoader:
        trainer = self.trainer
        self.loader = EpochAwareLoader(self.stream, num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                                       epoch_fn=(lambda: trainer.current_epoch) if trainer is not None else None,
                                       gather=self._gather if trainer is not None else None)
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
