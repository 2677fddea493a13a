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

Two repairs keep `auto` honest:

- `recover_interrupted_publish`: a directory checkpoint replaced without an atomic swap (aimv2.fileio.
  publish_directory) and killed between its two renames has no `NAME`, only `.NAME.old` (the previous
  version) and `.NAME.tmp` (the new, complete one): the new one is put back under `NAME`, else the old.
  `auto` does it first, and so does the start-up cleanup (aimv2.engine.checkpoint_io).
- `abandon_newer`: a run continued from an explicit, older checkpoint moves the newer checkpoints of its
  checkpoint directory aside into `abandoned/<time>/` (never deleted), so that the next `auto` (a SLURM
  requeue) continues the new line, not the abandoned one.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Optional

import torch

from aimv2.checkpoints.dcp import check_complete, is_dcp_checkpoint, load_meta, read_metadata
from aimv2.checkpoints.zero import load_client_state
from aimv2.engine.run_dir import LAST
from aimv2.errors import UserError
from aimv2.fileio import OLD_SUFFIX, TMP_SUFFIX, rename_noreplace

# RUN/checkpoints/abandoned/<time>/: what a rollback moved aside (no `.ckpt` suffix: never a candidate).
ABANDONED = "abandoned"

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


def recover_interrupted_publish(ckpt_dir: str | Path, names: Optional[set[str]] = None) -> list[Path]:
    """Put back every checkpoint (of `names`, all when None) whose directory publish was killed between its
    two renames: `NAME` missing beside `.NAME.old`. The new `.NAME.tmp` goes back under `NAME` when it is
    intact (`checkpoint_step`), else the previous `.NAME.old`; each is a warning on the log. Returns the
    paths put back.

    `.NAME.old` is the proof that the publish had begun, hence that every rank had finished writing
    `.NAME.tmp`; a `.NAME.tmp` without it may be a save killed before all ranks were done (DeepSpeed's rank
    0 writes its `latest` tag without waiting for the others) and is left to the cleanup, the previous
    checkpoints being intact under their names. Safe from several processes at once (every rank resolving
    `auto`): the renames never replace anything, and a rename another process made first is no error."""
    ckpt_dir = Path(ckpt_dir)
    restored: list[Path] = []
    olds = sorted(ckpt_dir.glob(f".*.ckpt{OLD_SUFFIX}")) if ckpt_dir.is_dir() else []
    for old in olds:
        name = old.name[1:-len(OLD_SUFFIX)]
        final, new = ckpt_dir / name, ckpt_dir / f".{name}{TMP_SUFFIX}"
        if (names is not None and name not in names) or final.is_symlink() or final.exists():
            continue
        for source, what in ((new, "the new checkpoint"), (old, "the previous checkpoint")):
            try:
                step = checkpoint_step(source)
            except ValueError:
                continue
            try:
                rename_noreplace(source, final)
            except OSError as err:
                if not (final.is_symlink() or final.exists()):  # else another process put one back first
                    log.warning("%s is missing and %s could not be put back: %s", final, source.name, err)
                break
            log.warning("%s was missing (a save killed while replacing it): put back %s (step %d) from %s",
                        final, what, step, source.name)
            restored.append(final)
            break
        else:
            if not (final.is_symlink() or final.exists()):  # else another process put one back meanwhile
                log.warning("%s is missing and neither %s nor %s is an intact checkpoint", final, new.name, old.name)
    return restored


def explicit_resume(resume: Optional[str]) -> bool:
    """`trainer.resume` names a checkpoint (not `auto`, `none` or unset)."""
    return resume not in (None, "auto", "none")


def _step_of(path: Path) -> Optional[int]:
    """The global step of a checkpoint, else the step in its name (a corrupt `step=N.ckpt`), else None."""
    try:
        return checkpoint_step(path)
    except ValueError:
        match = re.fullmatch(r"step=(\d+)\.ckpt", path.name)
        return int(match.group(1)) if match else None


def abandon_newer(resume: str | Path, ckpt_dir: str | Path) -> Optional[str]:
    """Before a run continues from the explicit checkpoint `resume`: move every checkpoint of `ckpt_dir`
    with a higher global step (corrupt ones by the step in their name; `last.ckpt` by its step, a link by
    its target's) into `ckpt_dir/abandoned/<time>/`, one atomic rename each, nothing deleted (links move
    with their targets, so a relative link still resolves). Returns the line that says what moved where,
    or None when nothing did. Run it from one process, before training."""
    ckpt_dir, resume = Path(ckpt_dir), Path(resume)
    step = checkpoint_step(resume)
    real = os.path.realpath(resume)
    newer = [p for p in candidates(ckpt_dir)
             if os.path.realpath(p) != real and p != resume and (s := _step_of(p)) is not None and s > step]
    if not newer:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = ckpt_dir / ABANDONED / stamp
    for i in range(1, 1000):  # two rollbacks in one second
        try:
            dest.mkdir(parents=True)
            break
        except FileExistsError:
            dest = ckpt_dir / ABANDONED / f"{stamp}-{i}"
    for path in newer:
        rename_noreplace(path, dest / path.name)
    return (f"trainer.resume={resume} (step {step}): moved the newer checkpoints of {ckpt_dir} aside to {dest} "
            f"(trainer.resume=auto never takes them; nothing deleted): {', '.join(p.name for p in newer)}")


def resolve_resume(resume: Optional[str], ckpt_dir: str | Path) -> Optional[str]:
    """The checkpoint path to hand to `Trainer.fit(ckpt_path=...)`, or None to start fresh. `auto` first
    puts back a checkpoint whose publish was killed half-way (`recover_interrupted_publish`)."""
    if resume is None:
        resume = "auto" if under_slurm() else "none"
    if resume == "none":
        return None
    if resume == "auto":
        recover_interrupted_publish(ckpt_dir)
        path = newest_intact(ckpt_dir)
        if path is None:
            log.info("trainer.resume=auto: no checkpoint in %s, starting fresh", ckpt_dir)
            return None
        log.info("trainer.resume=auto: continuing from %s", path)
        return str(path)
    path = Path(resume)
    if not path.exists() and not path.is_symlink():
        recover_interrupted_publish(path.parent, {path.name})  # named while its replacement was killed
    if not path.exists():
        raise UserError(f"trainer.resume: checkpoint not found: {resume}")
    try:
        checkpoint_step(path)
    except ValueError as err:
        raise UserError(f"trainer.resume: corrupt or truncated checkpoint: {resume} ({err})") from None
    return str(path)
