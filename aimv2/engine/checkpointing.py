"""A run's checkpoints, in one place: written atomically (AtomicCheckpointIO), the step-0 checkpoint,
which checkpoint a run resumes from (resolve_resume), and checkpoint-and-requeue on preemption.

Checkpoint files that appear complete or not at all.

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
call it as well (aimv2.engine.trainer).

A step-0 checkpoint: the weights a run starts from, before its first optimizer step.

Why: "does pre-training help?" needs the same architecture, built by the same seeded code, at random
initialization, probed the same way as the trained checkpoint. Rebuilding the model afterwards with
the same seed is fragile (anything that draws from the RNG between seeding and construction changes
the draw); saving the weights training actually started from is exact. The file is an ordinary
Lightning checkpoint, so `aimv2 probe --checkpoint` and `aimv2.load_encoder` read it like any other.

Which checkpoint a run continues from: `trainer.resume` resolved and validated before training.

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
  `auto` does it first, and so does the start-up cleanup (aimv2.engine.checkpointing).
- `abandon_newer`: a run continued from an explicit, older checkpoint moves the newer checkpoints of its
  checkpoint directory aside into `abandoned/<time>/` (never deleted), so that the next `auto` (a SLURM
  requeue) continues the new line, not the abandoned one.

Checkpoint-and-requeue on SLURM preemption, at a step boundary.

SLURM announces the end of a job with a signal: `#SBATCH --signal=SIGUSR1@90` sends SIGUSR1 to every
task 90 s before the time limit, and `scancel --signal=USR1 JOB` does so on demand; preemption and
`scancel` send SIGTERM. Lightning's own SLURM handler saves a checkpoint *inside* the signal handler,
i.e. at an arbitrary point of a step on each rank (ranks can be in different collectives: a hang),
with the step's data only half accounted for. Here the handler only raises a flag; after each
training step the ranks agree (one tiny all-reduce) whether any rank was signalled, and if so all
save `last.ckpt` together, and training ends by raising `Preempted` when the next batch would
start (after Lightning has logged the step, before anything else runs: stopping through
`trainer.should_stop` would let epoch-end hooks save checkpoints that record the interrupted epoch
as finished). `fit_until_signal` catches it: once every rank has torn down (logs flushed), rank 0
says where the checkpoint is and, on SIGUSR1, requeues the job (`scontrol requeue`; SLURM already
requeues preempted jobs itself) as the very last thing: a requeue makes SLURM signal every process of
the job at once. The requeued job starts the same script, and `trainer.resume` (auto under SLURM)
continues from that checkpoint.

`LastCheckpointAtEnd` makes `last.ckpt` the final state of every finished run (Lightning's
ModelCheckpoint leaves it at the last multiple of `checkpoint_every_n_steps`).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback

from aimv2.checkpoints import schema
from aimv2.checkpoints.dcp import check_complete, is_dcp_checkpoint, load_meta, read_metadata
from aimv2.checkpoints.zero import load_client_state
from aimv2.engine.run_dir import LAST
from aimv2.errors import UserError, one_line
from aimv2.fileio import OLD_SUFFIX, REMOVING_SUFFIX, TMP_SUFFIX, atomic_file, discard, rename_noreplace


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
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
    whose publish was killed between its two renames (aimv2.engine.checkpointing.recover_interrupted_publish).
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


def tidy_before_training(ckpt_dir: str | Path, resume_setting: str | None, resume: str | None) -> None:
    """What every training job does before training, on one process: put back an interrupted publish and
    remove the remains of killed saves (said on stdout); on a rollback (`trainer.resume` names an older
    checkpoint: `resume_setting` as configured, `resume` as resolved) move the newer checkpoints aside,
    said on stderr, else the next `auto` (a requeue) would jump back to them."""
    import sys

    for name in remove_stale_temporaries(ckpt_dir):
        print(f"removed the remains of an interrupted checkpoint save: {Path(ckpt_dir) / name}")
    if explicit_resume(resume_setting) and (moved := abandon_newer(resume, ckpt_dir)):
        print(moved, file=sys.stderr, flush=True)


INITIAL_NAME = "step=0000000.ckpt"  # ModelCheckpoint's own naming: sorts before every later step


class InitialCheckpoint(Callback):
    """Save `checkpoint_dir/step=0000000.ckpt` when a fresh run starts training (not on resume)."""

    def __init__(self, checkpoint_dir: str | Path):
        self.path = Path(checkpoint_dir) / INITIAL_NAME

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0:
            # A full checkpoint (optimizer too): `trainer.resume=auto` may pick it after an early stop.
            trainer.save_checkpoint(self.path, weights_only=False)


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
    step = schema.global_step(state) if isinstance(state, dict) else None
    if step is None:
        raise ValueError("not a Lightning training checkpoint (no global_step)")
    return step


def candidates(ckpt_dir: str | Path) -> list[Path]:
    """Checkpoints in a run's checkpoint directory (files, ZeRO or DCP directories), temporaries excluded."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.name.endswith(".ckpt") and not p.name.startswith("."))


def newest_intact(ckpt_dir: str | Path) -> Path | None:
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


def recover_interrupted_publish(ckpt_dir: str | Path, names: set[str] | None = None) -> list[Path]:
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
        name = old.name[1 : -len(OLD_SUFFIX)]
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
            log.warning(
                "%s was missing (a save killed while replacing it): put back %s (step %d) from %s",
                final,
                what,
                step,
                source.name,
            )
            restored.append(final)
            break
        else:
            if not (final.is_symlink() or final.exists()):  # else another process put one back meanwhile
                log.warning("%s is missing and neither %s nor %s is an intact checkpoint", final, new.name, old.name)
    return restored


def explicit_resume(resume: str | None) -> bool:
    """`trainer.resume` names a checkpoint (not `auto`, `none` or unset)."""
    return resume not in (None, "auto", "none")


def _step_of(path: Path) -> int | None:
    """The global step of a checkpoint, else the step in its name (a corrupt `step=N.ckpt`), else None."""
    try:
        return checkpoint_step(path)
    except ValueError:
        match = re.fullmatch(r"step=(\d+)\.ckpt", path.name)
        return int(match.group(1)) if match else None


def abandon_newer(resume: str | Path, ckpt_dir: str | Path) -> str | None:
    """Before a run continues from the explicit checkpoint `resume`: move every checkpoint of `ckpt_dir`
    with a higher global step (corrupt ones by the step in their name; `last.ckpt` by its step, a link by
    its target's) into `ckpt_dir/abandoned/<time>/`, one atomic rename each, nothing deleted (links move
    with their targets, so a relative link still resolves). Returns the line that says what moved where,
    or None when nothing did. Run it from one process, before training."""
    ckpt_dir, resume = Path(ckpt_dir), Path(resume)
    step = checkpoint_step(resume)
    real = os.path.realpath(resume)
    newer = [
        p
        for p in candidates(ckpt_dir)
        if os.path.realpath(p) != real and p != resume and (s := _step_of(p)) is not None and s > step
    ]
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
    return (
        f"trainer.resume={resume} (step {step}): moved the newer checkpoints of {ckpt_dir} aside to {dest} "
        f"(trainer.resume=auto never takes them; nothing deleted): {', '.join(p.name for p in newer)}"
    )


def resolve_resume(resume: str | None, ckpt_dir: str | Path) -> str | None:
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


log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised on every rank once the preemption checkpoint is written. A SystemExit with status 0:
    the process should end, successfully (SLURM requeues or ends the job), also under callers that do
    not catch it. `fit_until_signal` says where the checkpoint is and requeues before it goes on up."""

    def __init__(self, step: int, path: Path, requeue: bool):
        super().__init__(0)
        self.step, self.path, self.requeue, self.requeued = step, path, requeue, False  # requeue: asked for

    def __str__(self) -> str:
        return f"stopped by a signal at step {self.step}: saved {self.path}"


def slurm_job_id() -> str | None:
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")


class PreemptionCheckpoint(Callback):
    """`requeue_signal` (SIGUSR1) -> save, requeue under SLURM, stop; SIGTERM (SLURM's preemption and
    `scancel`, `kill`, a container or node shutdown) -> save, stop, under SLURM or not. Data workers,
    forked after `install`, inherit the flag-only handler, so a signal sent to every process of the job
    does not kill them under the ranks (which would end the run without its checkpoint)."""

    def __init__(self, checkpoint_dir: str | Path, slurm: bool, requeue_signal: int = signal.SIGUSR1):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.slurm, self.requeue_signal = slurm, requeue_signal
        self.received: int | None = None
        self._stop: Preempted | None = None
        self._previous: dict[int, object] = {}

    def _signals(self) -> list[int]:
        return [self.requeue_signal, signal.SIGTERM]

    def _handler(self, signum, frame) -> None:  # only a flag: the work happens at the next step boundary
        self.received = signum

    def install(self) -> None:
        """Catch the signals from now on (called again at train start, after Lightning's handlers)."""
        for sig in self._signals():
            try:
                previous = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: signals cannot be handled here
                return
            self._previous.setdefault(sig, previous)

    def on_train_start(self, trainer, pl_module) -> None:
        self.install()

    def uninstall(self) -> None:
        """Give the signals back to whoever had them before `install` (e.g. the test runner)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.uninstall()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._stop is not None or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # only at optimizer-step boundaries: accumulated gradients are not checkpointed
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        step = trainer.global_step
        path = self.checkpoint_dir / LAST
        trainer.save_checkpoint(path, weights_only=False)  # collective: every rank is here, after the same step
        signum = self.received if self.received is not None else self.requeue_signal
        if trainer.is_global_zero:
            log.warning("signal %s: saved %s at step %d; stopping", signal.Signals(signum).name, path, step)
        self._stop = Preempted(step, path, requeue=self.slurm and signum == self.requeue_signal)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._stop is not None:
            raise self._stop

    def on_train_end(self, trainer, pl_module) -> None:
        if self._stop is not None:  # the signal came with the last step of the run
            raise self._stop


def fit_until_signal(trainer, fit: Callable[[], object]) -> None:
    """Run `fit()` with the preemption signals caught from now on (a signal during start-up must not kill
    the job). When one ends training, every rank tears down, rank 0 prints where the checkpoint is and
    requeues if asked, last (SLURM then SIGTERMs every process of the job), and `Preempted` goes on up:
    no caller may go on (a probe, an evaluation) with a partial run."""
    preemption = [cb for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint)]
    for callback in preemption:
        callback.install()
    try:
        fit()
    except Preempted as stop:
        wait_for_every_rank()
        if trainer.is_global_zero:
            stop.requeued = stop.requeue and requeue_slurm_job()
            then = "the SLURM job was requeued and will continue from it"
            print(f"{stop}; {then if stop.requeued else 'continue with trainer.resume=auto'}", flush=True)
        raise
    finally:  # only now are the handlers given back: the requeue's SIGTERM just set the flag
        for callback in preemption:
            callback.uninstall()


def wait_for_every_rank(timeout_s: float = 300.0) -> None:
    """A bounded barrier: a rank that died in its teardown must not keep rank 0 from requeueing."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    nccl = torch.distributed.get_backend() == "nccl"  # name the device, as Lightning does: else torch warns
    try:
        work = torch.distributed.barrier(async_op=True, device_ids=[torch.cuda.current_device()] if nccl else None)
        work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as error:  # a timed-out or broken group: requeue anyway, the checkpoint is saved
        log.warning("not every rank ended the preempted run within %.0f s: %s", timeout_s, one_line(str(error)))


def requeue_slurm_job() -> bool:
    job = slurm_job_id()
    if job is None:
        return False
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
        return False
    log.warning("requeued SLURM job %s", job)
    return True


class LastCheckpointAtEnd(Callback):
    def __init__(self, checkpoint_dir: str | Path):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.saved_step: int | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.saved_step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step > 0 and self.saved_step != trainer.global_step:
            trainer.save_checkpoint(self.checkpoint_dir / LAST, weights_only=False)
