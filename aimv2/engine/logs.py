"""What a run logs and prints: its CSV metrics (kept across resumes, read back for the demo and `aimv2
report`) and its progress lines.

A CSV logger that survives resumes.

Lightning's CSVLogger deletes an existing metrics.csv when the run directory is reused, so a
resumed run would lose its history. Ours appends instead, and on resume drops the rows logged
after the checkpoint's step (those steps are run again), so the file reads as one clean run.

Lightning writes a step's row after the step's checkpoint (callbacks, checkpoints last, then the
loggers), so a job killed between the two would resume without that row: a gap. Every checkpoint
therefore carries its own step's row, and a resume puts it back when the file lacks it.

Reading a run's CSV metrics back: what a user wants to know at the end of a run.

`aimv2 report` (aimv2/viz/report.py) builds on these: curves from `read_metrics`, final values from
`tail_mean`, so the demo's one-line trend and the report agree on what "final" means.

Pre-training progress: Lightning's tqdm bar on a terminal, whole lines (no carriage returns) elsewhere.

`trainer.progress_bar` stays the switch; this only picks the form. Lightning's own bar writes to
stdout, so stdout decides: a terminal keeps Lightning's default bar, anything else (CI, SLURM's
slurm-JOB.out, `| tee`) gets `LineProgressBar`, which prints through `aimv2.progress.LineProgress`:

    train: 120/300 (40%) 3.9 it/s ETA 0:46 loss=1.23 loss_img=0.61 loss_text=0.98 samples/s=125
"""

from __future__ import annotations

import csv
import math
import os
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from aimv2.checkpoints import schema
from aimv2.fileio import atomic_file
from aimv2.progress import LineProgress, progress_mode


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, appending to an existing metrics.csv instead of deleting it.

    Private on purpose, and pinned: Lightning 2.6.6 has no public switch for this. The writer's
    `__init__` always calls `_check_log_dir_exists`, which removes metrics.csv from a non-empty log
    directory (lightning/fabric/loggers/csv_logs.py); neither CSVLogger nor the writer takes an
    argument to keep it. Overriding that one method is the smallest way in;
    tests/test_metrics_resume.py fails with a clear message when an upgrade renames it or stops
    calling it."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])  # new keys rewrite the header, keeping rows

    def trim_after(self, step: int) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames or [], [r for r in reader if int(r["step"]) < step]
        with atomic_file(self.metrics_file_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def restore_row(self, step: int, metrics: dict) -> None:
        """Append the row of `step` (the checkpoint's own) to a file that holds the run's earlier rows
        but not this one (not to a fresh run directory that was handed only a checkpoint)."""
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            steps = [int(r["step"]) for r in csv.DictReader(f)]
        if steps and step not in steps:
            self.log_metrics(metrics, step)
            self.save()


class ResumableCSVLogger(CSVLogger):
    @property
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class TrimMetricsOnResume(Callback):
    """At the start of training, drop CSV rows from steps the restored checkpoint has not seen, and
    restore the checkpoint's own step's row if the file lacks it. Rows are labelled by Lightning's
    private `_batches_that_stepped`, which some resumes leave one behind `global_step` (benchmarks/
    chaos.py: a step's row twice, the run's last one never): each step starts with it put right."""

    def __init__(self):
        self._row: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        step = trainer.global_step  # the row Lightning logs right after this save has step `step - 1`
        every = trainer.log_every_n_steps
        if step > 0 and every and step % every == 0:
            # The step's logged values (on-step caches, no collective); public logged_metrics would
            # also hold keys of earlier steps.
            logged = trainer._logger_connector.metrics["log"]
            row = {k: float(v) for k, v in logged.items() if getattr(v, "numel", lambda: 1)() == 1}
            schema.write(checkpoint, metrics_row={"step": step - 1, "metrics": {**row, "epoch": trainer.current_epoch}})

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._row = schema.read(checkpoint, trainer.ckpt_path or "the checkpoint").get("metrics_row")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        loop = trainer.fit_loop.epoch_loop  # one optimizer, automatic optimization: equal when nothing lags
        if loop._batches_that_stepped != trainer.global_step:
            loop._batches_that_stepped = trainer.global_step

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                writer = logger.experiment
                writer.trim_after(trainer.global_step)
                if self._row is not None and self._row["step"] == trainer.global_step - 1:
                    writer.restore_row(self._row["step"], self._row["metrics"])


def read_metric(metrics_csv: str | Path, name: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric from Lightning's metrics.csv (rows hold some columns only)."""
    return read_metrics(metrics_csv, [name])[name]


def read_metrics(metrics_csv: str | Path, names: list[str] | tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs of several metrics in one pass over the file; a missing column gives []."""
    series: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for name in names:
                if row.get(name):
                    series[name].append((int(row["step"]), float(row[name])))
    return series


def tail_mean(values: list[float], window: int = 3) -> float:
    """Mean of the last `window` values (one logged point is noisy); nan when there are none."""
    tail = values[-window:]
    return sum(tail) / len(tail) if tail else math.nan


def loss_trend(metrics_csv: str | Path, window: int = 3) -> str:
    """'image loss 1.02 -> 0.61, text loss 10.7 -> 1.9, skipped 0', each the mean of `window` logged points."""
    series = read_metrics(metrics_csv, ("train/loss_img", "train/loss_text", "data/skipped_samples"))
    parts = []
    for label, key in (("image loss", "train/loss_img"), ("text loss", "train/loss_text")):
        values = [v for _, v in series[key]]
        if values:
            first = sum(values[:window]) / len(values[:window])
            parts.append(f"{label} {first:.3f} -> {tail_mean(values, window):.3f}")
    skipped = series["data/skipped_samples"]
    if skipped:
        parts.append(f"skipped samples {int(skipped[-1][1])}")
    return "losses over the run: " + ", ".join(parts)


# Metrics shown, under short names: the losses and throughput a person checks at a glance.
_SHOWN = {
    "train/loss": "loss",
    "train/loss_img": "loss_img",
    "train/loss_text": "loss_text",
    "train/samples_per_sec": "samples/s",
}


class LineProgressBar(ProgressBar):
    """One line per 10% of the optimizer steps and at least every `interval` seconds, on rank 0."""

    def __init__(self, interval: float | None = None):
        super().__init__()
        self.interval = interval
        self._enabled = True
        self._bar: LineProgress | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._enabled:
            return
        total = trainer.estimated_stepping_batches  # optimizer steps in the whole run (inf when unbounded)
        self._bar = LineProgress(
            total=total,
            desc="train",
            unit="step",
            initial=trainer.global_step,
            stream=sys.stderr,
            interval=self.interval,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._bar is None:
            return
        if self._bar.due(trainer.global_step):  # reading the metrics copies them to the host: a device sync
            self._set_postfix(trainer, pl_module)
        self._bar.update(trainer.global_step - self._bar.n)

    def _set_postfix(self, trainer, pl_module) -> None:
        metrics = self.get_metrics(trainer, pl_module)
        self._bar.set_postfix({short: float(metrics[key]) for key, short in _SHOWN.items() if key in metrics})

    def on_train_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._set_postfix(trainer, pl_module)
            self._bar.close()
            self._bar = None


def progress_callbacks(enabled: bool) -> list[Callback]:
    """The progress-bar callback for `Trainer(callbacks=...)`: none when Lightning's default tqdm bar
    fits (a terminal) or when `enabled` is False (`enable_progress_bar=False` refuses a bar callback);
    a silent one when AIMV2_PROGRESS=off (it replaces Lightning's default bar)."""
    if not enabled:
        return []
    mode = progress_mode(sys.stdout)
    if mode == "bar":
        return []
    bar = LineProgressBar()
    if mode == "off":
        bar.disable()
    return [bar]


class RankCounters:
    """Counts a rank keeps for itself and logs summed over ranks (skipped samples, shard errors), as
    device tensors (adding a batch's count needs no host sync). Not buffers: DDP would copy rank 0's
    values to every rank when it wraps the model, after a resume restored them. A checkpoint keeps
    their sum over ranks; a resume puts it back on rank 0 and zero elsewhere, so the logged sum goes
    on from the saved total at any world size."""

    def __init__(self, *names: str):
        self.counts = {name: torch.zeros((), dtype=torch.long) for name in names}

    def add(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """The running count after adding `value` (a batch's count, on the step's device)."""
        self.counts[name] = self.counts[name].to(value.device) + value
        return self.counts[name]

    def save(self, trainer, checkpoint: dict) -> None:
        """A collective: every rank runs on_save_checkpoint. `trainer` is None outside a fit (one process)."""
        device = trainer.strategy.root_device if trainer is not None else "cpu"
        # one all-reduce for every counter; torch.stack copies, so this rank's own counts stay its own
        values = torch.stack([value.to(device) for value in self.counts.values()])
        if trainer is not None and trainer.world_size > 1:
            values = trainer.strategy.reduce(values, reduce_op="sum")
        schema.write(checkpoint, rank_counters=dict(zip(self.counts, map(int, values.tolist()))))

    def restore(self, trainer, checkpoint: dict) -> None:
        """`trainer` is None under load_from_checkpoint (one process: rank 0). Checkpoints written before
        the sum was kept held rank 0's counts as buffers in their weights: those are taken (and dropped
        from the weights)."""
        state = checkpoint.get("state_dict", {})
        saved = {name: int(state.pop(name)) for name in self.counts if name in state}
        totals = schema.read(checkpoint).get("rank_counters") or saved
        rank_zero = trainer is None or trainer.global_rank == 0
        for name in self.counts:
            self.counts[name] = torch.tensor(int(totals.get(name, 0)) if rank_zero else 0, dtype=torch.long)
