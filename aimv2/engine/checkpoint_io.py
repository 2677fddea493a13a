"""Checkpoint files that appear complete or not at all.

Lightning's TorchCheckpointIO serializes the whole checkpoint into memory, writes it to a temporary
file in the system temp directory and then *copies* it over the final path (an fsspec transaction
across file systems): a job killed during that copy leaves a truncated `step=N.ckpt`, and the
checkpoint briefly takes twice its size in host memory. Here `torch.save` streams straight into a
hidden temporary file beside the target, which is fsynced and renamed over it (aimv2.fileio): the
rename is atomic on POSIX file systems, so readers (and `trainer.resume=auto`) see the old file or
the new one.

Removal is atomic too: Lightning prunes old checkpoints (`keep_checkpoints`) with an in-place recursive
delete, which a kill can stop half-way, leaving a directory under a valid `step=N.ckpt` name that may
still hold the files that make it look intact. `remove_checkpoint` renames a directory to a hidden
`.NAME.removing` first (aimv2.fileio.discard); the strategies that bypass the CheckpointIO for removal
call it as well (aimv2.engine.strategy).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

from aimv2.engine.resume import abandon_newer, explicit_resume, recover_interrupted_publish
from aimv2.fileio import OLD_SUFFIX, REMOVING_SUFFIX, TMP_SUFFIX, atomic_file, discard

# Temporary names: `.NAME.<pid>.tmp` (files), `.NAME.tmp` (directories); never taken for checkpoints.


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's fsspec path
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"storage_options are not supported by {type(self).__name__}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A pid in the temporary name: ranks of one node never share a temporary (aimv2.fileio).
        with atomic_file(path, tmp_name=f".{path.name}.{os.getpid()}{TMP_SUFFIX}", sync_dir=True) as tmp:
            torch.save(checkpoint, tmp)

    def remove_checkpoint(self, path: _PATH) -> None:
        remove_checkpoint(path)


def remove_checkpoint(path: _PATH) -> None:
    """Remove a checkpoint file or directory; a local directory leaves its name in one atomic rename
    before it is deleted (a kill never leaves part of it under `step=N.ckpt`). Remote paths: fsspec."""
    if "://" in str(path):
        fs = get_filesystem(path)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        return
    discard(path)


def remove_stale_temporaries(ckpt_dir: str | Path) -> list[str]:
    """Delete what killed saves and removals left behind (`.NAME.<pid>.tmp` files, `.NAME.tmp`/`.NAME.old`
    directories of a directory publish, `.NAME.removing` of a removal), after putting back a checkpoint
    whose publish was killed between its two renames (aimv2.engine.resume.recover_interrupted_publish).
    Call it before training starts, from one process: nothing is being written then."""
    import shutil

    recover_interrupted_publish(ckpt_dir)
    removed = []
    ckpt_dir = Path(ckpt_dir)
    for path in ckpt_dir.glob(".*") if ckpt_dir.is_dir() else []:
        if path.name.endswith((TMP_SUFFIX, OLD_SUFFIX, REMOVING_SUFFIX)):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path.name)
    return sorted(removed)


def tidy_before_training(ckpt_dir: str | Path, resume_setting: Optional[str], resume: Optional[str]) -> None:
    """What every training job does before training, on one process: put back an interrupted publish and
    remove the remains of killed saves (said on stdout); on a rollback (`trainer.resume` names an older
    checkpoint: `resume_setting` as configured, `resume` as resolved) move the newer checkpoints aside,
    said on stderr, else the next `auto` (a requeue) would jump back to them."""
    import sys

    for name in remove_stale_temporaries(ckpt_dir):
        print(f"removed the remains of an interrupted checkpoint save: {Path(ckpt_dir) / name}")
    if explicit_resume(resume_setting) and (moved := abandon_newer(resume, ckpt_dir)):
        print(moved, file=sys.stderr, flush=True)
