"""Which checkpoint a run continues from: `trainer.resume` resolved and validated before training.

- a path: must be an intact checkpoint, else a one-line UserError naming it;
- `auto`: the newest intact checkpoint in RUN/checkpoints (by global step, then modification
  time); corrupt or truncated ones are reported and passed over; none at all starts fresh;
- `none`: start fresh;
- unset: `auto` under SLURM (a requeued job continues by itself), fresh otherwise.

"Intact" means it loads with `torch.load(weights_only=True, mmap=True)`: the zip directory at the
end of the file is found (a truncated or overwritten file fails here) and its pickle holds only
plain data, without reading the tensor bytes of a multi-GB checkpoint. ZeRO checkpoints
(directories) are intact when their `latest` tag and the rank-0 model states load the same way.
DCP checkpoints (directories of the fsdp2 strategy, aimv2.checkpoints.dcp) are intact when DCP's
index `.metadata` -- written last, once every rank's shards are on disk -- reads (safely unpickled,
no shard read) and Lightning's `meta.pt` loads the same way; a directory without them is a killed save.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch

from aimv2.checkpoints.dcp import check_complete, is_dcp_checkpoint, load_meta, read_metadata
from aimv2.checkpoints.zero import load_client_state
from aimv2.engine.run_dir import LAST
from aimv2.errors import UserError

log = logging.getLogger(__name__)


def under_slurm() -> bool:
    """A job step started by srun (not an interactive `bash` allocation): Lightning's own test, without
    the warning its SLURMEnvironment.detect() prints on every machine that merely has srun installed."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def _load_light(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def checkpoint_step(path: str | Path) -> int:
    """The global step stored in an intact checkpoint; raises ValueError saying why it is not intact."""
    path = Path(path)
    try:
        if is_dcp_checkpoint(path):
            check_complete(path, need_meta=True)  # DCP's index and Lightning's meta.pt, both written last
            read_metadata(path)  # the index reads (unpickled safely; no shard is read)
            state = load_meta(path, mmap=True)
        elif path.is_dir():
            state = load_client_state(path, mmap=True)
        else:
            state = _load_light(path)
    except Exception as err:  # zip/EOF/unpickling errors all mean "cannot be resumed from"
        text = str(err).strip().removeprefix(f"{path}: ")  # the caller names the path itself
        reason = text.splitlines()[0].split(". ")[0] if text else type(err).__name__
        if "mmap can only be used" in reason:  # torch's words for "this is no zip archive at all"
            reason = "not a PyTorch checkpoint (no zip archive)"
        raise ValueError(reason[:160]) from None
    if not isinstance(state, dict) or "global_step" not in state:
        raise ValueError("not a Lightning training checkpoint (no global_step)")
    return int(state["global_step"])


def candidates(ckpt_dir: str | Path) -> list[Path]:
    """Checkpoints in a run's checkpoint directory (files, ZeRO or DCP directories), temporaries excluded."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.name.endswith(".ckpt") and not p.name.startswith("."))


def newest_intact(ckpt_dir: str | Path) -> Optional[Path]:
    """The newest checkpoint that loads; corrupt ones are logged and passed over."""
    found, broken, seen = [], [], set()
    for path in candidates(ckpt_dir):
        real = os.path.realpath(path)
        if real in seen:  # last.ckpt may be a link to a step=N.ckpt
            continue
        seen.add(real)
        try:
            found.append((checkpoint_step(path), path.stat().st_mtime, path.name != LAST, path))
        except ValueError as err:
            broken.append(f"{path.name} ({err})")
            log.warning("trainer.resume=auto: skipping unreadable checkpoint %s: %s", path, err)
    if found:
        return max(found)[3]
    if broken:
        raise UserError(f"trainer.resume=auto: no intact checkpoint in {ckpt_dir}: " + "; ".join(broken))
    return None


def resolve_resume(resume: Optional[str], ckpt_dir: str | Path) -> Optional[str]:
    """The checkpoint path to hand to `Trainer.fit(ckpt_path=...)`, or None to start fresh."""
    if resume is None:
        resume = "auto" if under_slurm() else "none"
    if resume == "none":
        return None
    if resume == "auto":
        path = newest_intact(ckpt_dir)
        if path is None:
            log.info("trainer.resume=auto: no checkpoint in %s, starting fresh", ckpt_dir)
            return None
        log.info("trainer.resume=auto: continuing from %s", path)
        return str(path)
    path = Path(resume)
    if not path.exists():
        raise UserError(f"trainer.resume: checkpoint not found: {resume}")
    try:
        checkpoint_step(path)
    except ValueError as err:
        raise UserError(f"trainer.resume: corrupt or truncated checkpoint: {resume} ({err})") from None
    return str(path)
