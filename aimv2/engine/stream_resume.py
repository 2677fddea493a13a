"""The training side of a data stream: a job's data module whose stream continues exactly where a
checkpoint left it, and the bookkeeping of which batches a step has finished with.

The data module base of every job that trains on a `ShardStream` (pre-training, compressor
alignment): its training stream continues exactly where a checkpoint left it.

The loader (aimv2.data.loader) knows where every worker's stream stands; its positions go into every
checkpoint through the data module's `state_dict` (Lightning restores data modules before any data is
requested; its stateful-loader path comes too late when `estimated_stepping_batches` builds the
loader early) and are handed back to the loader before its first batch. Positions advance only for
batches a training step has finished with (aimv2.engine.stream_resume.StreamPosition, installed by
`build_trainer`), so a resumed run sees exactly the batches the uninterrupted one would have.

Shard metadata is read by one process: in a multi-process run rank 0 resolves the sources (their
manifests, or a stats file per shard where there is none) and broadcasts the tables, so the other
ranks open no metadata file at start (a requeued 256-rank job would otherwise repeat every read 256
times); an error there reaches every rank as the same one-line UserError.

Training-side bookkeeping of the data stream: which batches a step has finished with.

`StreamPosition` tells the loader (aimv2.data.loader) after every finished step, so the position a
checkpoint stores is that of the last batch the weights have seen, never of a prefetched one. Lightning
runs checkpoint callbacks after all others, so the position is current when ModelCheckpoint saves.
In epoch mode it also logs `data/repeated_samples`: samples trained on a second time within their
epoch (only where a slot's range has too few usable samples for its batches: aimv2.data.stream),
summed over ranks; 0 in a healthy run.

`SampleLog` (trainer.log_samples) appends the keys of every consumed sample to
RUN/logs/samples/rank{R}.tsv, one line per batch: `epoch  batch  step  key key ...` (step = optimizer
steps done after the batch). A resumed run first drops the lines of steps the checkpoint has not
seen, so the file reads as one uninterrupted run: an audit of the data order. Rank 0 does the same
for the files of ranks the resumed run no longer has (a run resumed on fewer ranks).
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from aimv2.data.stream import EpochAwareLoader, ShardStream
from aimv2.errors import UserError
from aimv2.fileio import atomic_write


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
        self.loader = EpochAwareLoader(
            self.stream,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            epoch_fn=(lambda: trainer.current_epoch) if trainer is not None else None,
            gather=self._gather if trainer is not None else None,
            on_change=self.on_change,
        )
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
        if self.trainer.world_size == 1:
            return table[None]
        # torch.distributed directly: Lightning's all_gather goes through torch.distributed.nn.functional,
        # deprecated in torch 2.14 (a warning on every rank at every checkpoint).
        table = table.to(self.trainer.strategy.root_device).contiguous()
        parts = [torch.empty_like(table) for _ in range(self.trainer.world_size)]
        torch.distributed.all_gather(parts, table)
        return torch.stack(parts).cpu()


class StreamPosition(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loader = trainer.train_dataloader
        if isinstance(batch, dict) and "stream_pos" in batch and hasattr(loader, "mark_consumed"):
            loader.mark_consumed(batch["stream_pos"], batch.get("repeated", 0))
            # A running total, so logging it only on the steps the logger writes loses nothing and spares
            # the other steps an all-reduce.
            if loader.dataset.mode == "epoch" and trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
                pl_module.log("data/repeated_samples", float(loader.repeated), reduce_fx="sum", sync_dist=True)


class SampleLog(Callback):
    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self._file = None

    def path(self, rank: int) -> Path:
        return self.log_dir / f"rank{rank}.tsv"

    def on_train_start(self, trainer, pl_module) -> None:
        path = self.path(trainer.global_rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        _truncate(path, trainer.global_step)
        if trainer.global_rank == 0:  # the logs of ranks this run no longer has
            for other in self.log_dir.glob("rank*.tsv"):
                rank = other.stem[4:]
                if rank.isdigit() and int(rank) >= trainer.world_size:
                    _truncate(other, trainer.global_step)
        self._file = open(path, "a", buffering=1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._file is not None and isinstance(batch, dict) and "keys" in batch:
            keys = " ".join(batch["keys"])
            self._file.write(f"{trainer.current_epoch}\t{batch_idx}\t{trainer.global_step}\t{keys}\n")

    def on_train_end(self, trainer, pl_module) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def _truncate(path: Path, step: int) -> None:
    """Keep what the restored checkpoint (at `step`) has seen; drop torn and later lines."""
    if path.is_file():
        kept = [
            line
            for line in path.read_text().splitlines(keepends=True)
            if line.endswith("\n") and _step(line) is not None and _step(line) <= step
        ]
        atomic_write(path, "".join(kept))


def _step(line: str):
    parts = line.split("\t")
    try:
        return int(parts[2]) if len(parts) == 4 else None
    except ValueError:
        return None


def read_sample_log(path: str | Path) -> list[tuple[int, int, int, list[str]]]:
    """(epoch, batch index, step, keys) per line of a sample log."""
    out = []
    for line in Path(path).read_text().splitlines():
        epoch, batch, step, keys = line.split("\t")
        out.append((int(epoch), int(batch), int(step), keys.split(" ")))
    return out
