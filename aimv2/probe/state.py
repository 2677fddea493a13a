"""Head-training state on disk (heads.pt): weights, AdamW moments and the epochs done, tagged with a
fingerprint of the settings so that a probe resumes only what was trained the same way."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from aimv2.fileio import atomic_file
from aimv2.probe.grid import HeadGrid


def load_head_state(grid: HeadGrid, path: Path, fingerprint: str) -> int:
    """Epochs already done (0 when no matching state): heads, optimizer moments and step restored, each
    on the device (and dtype) of the grid's own tensors, wherever the file was written."""
    if not path.is_file():
        return 0
    try:  # read onto the CPU (written on any device); the grid places every tensor beside its parameter
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged state file: start over
        return 0
    if state.get("fingerprint") != fingerprint:
        print(f"probe: {path} was made with other settings; training the heads from scratch", file=sys.stderr)
        return 0
    grid.load_state_dict(state["grid"])
    grid.load_optimizer_state(state["optim"])
    print(f"probe: resuming head training after epoch {state['epoch']} from {path}", file=sys.stderr)
    return int(state["epoch"])


def save_head_state(grid: HeadGrid, path: Path, fingerprint: str, epoch: int) -> None:
    """Atomic: a crash mid-write leaves the previous epoch's state."""
    with atomic_file(path) as tmp:
        torch.save({"fingerprint": fingerprint, "epoch": epoch, "grid": grid.state_dict(),
                    "optim": grid.optimizer_state()}, tmp)
