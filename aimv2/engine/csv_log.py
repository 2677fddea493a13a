"""A CSV logger that survives resumes.

Lightning's CSVLogger deletes an existing metrics.csv when the run directory is reused, so a
resumed run would lose its history. Ours appends instead, and on resume drops the rows logged
after the checkpoint's step (those steps are run again), so the file reads as one clean run.

Lightning writes a step's row after the step's checkpoint (callbacks, checkpoints last, then the
loggers), so a job killed between the two would resume without that row: a gap. Every checkpoint
therefore carries its own step's row, and a resume puts it back when the file lacks it.
"""

from __future__ import annotations

import csv
import os

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from aimv2.fileio import atomic_file


class _AppendingWriter(ExperimentWriter):
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
    restore the checkpoint's own step's row if the file lacks it."""

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
            checkpoint["metrics_row"] = {"step": step - 1, "metrics": {**row, "epoch": trainer.current_epoch}}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._row = checkpoint.get("metrics_row")

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                writer = logger.experiment
                writer.trim_after(trainer.global_step)
                if self._row is not None and self._row["step"] == trainer.global_step - 1:
                    writer.restore_row(self._row["step"], self._row["metrics"])
