"""Training-side bookkeeping of the data stream: which batches a step has finished with.

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

from lightning.pytorch.callbacks import Callback

from aimv2.fileio import atomic_write


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
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if line.endswith("\n") and _step(line) is not None and _step(line) <= step]
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
