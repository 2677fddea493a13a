"""Pre-training progress: Lightning's tqdm bar on a terminal, whole lines (no carriage returns) elsewhere.

`trainer.progress_bar` stays the switch; this only picks the form. Lightning's own bar writes to
stdout, so stdout decides: a terminal keeps Lightning's default bar, anything else (CI, SLURM's
slurm-JOB.out, `| tee`) gets `LineProgressBar`, which prints through `aimv2.progress.LineProgress`:

    train: 120/300 (40%) 3.9 it/s ETA 0:46 loss=1.23 loss_img=0.61 loss_text=0.98 samples/s=125
"""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.progress import ProgressBar

from aimv2.progress import LineProgress, progress_mode

# Metrics shown, under short names: the losses and throughput a person checks at a glance.
_SHOWN = {"train/loss": "loss", "train/loss_img": "loss_img", "train/loss_text": "loss_text",
          "train/samples_per_sec": "samples/s"}


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
        self._bar = LineProgress(total=total, desc="train", unit="step", initial=trainer.global_step,
                                 stream=sys.stderr, interval=self.interval)

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
