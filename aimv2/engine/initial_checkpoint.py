"""A step-0 checkpoint: the weights a run starts from, before its first optimizer step.

Why: "does pre-training help?" needs the same architecture, built by the same seeded code, at random
initialization, probed the same way as the trained checkpoint. Rebuilding the model afterwards with
the same seed is fragile (anything that draws from the RNG between seeding and construction changes
the draw); saving the weights training actually started from is exact. The file is an ordinary
Lightning checkpoint, so `aimv2 probe --checkpoint` and `aimv2.load_encoder` read it like any other.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback

INITIAL_NAME = "step=0000000.ckpt"  # ModelCheckpoint's own naming: sorts before every later step


class InitialCheckpoint(Callback):
    """Save `checkpoint_dir/step=0000000.ckpt` when a fresh run starts training (not on resume)."""

    def __init__(self, checkpoint_dir: str | Path):
        self.path = Path(checkpoint_dir) / INITIAL_NAME

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0:
            # A full checkpoint (optimizer too): `trainer.resume=auto` may pick it after an early stop.
            trainer.save_checkpoint(self.path, weights_only=False)
