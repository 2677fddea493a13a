"""Checkpoint-and-requeue on SLURM preemption, at a step boundary.

SLURM announces the end of a job with a signal: `#SBATCH --signal=SIGUSR1@90` sends SIGUSR1 to every
task 90 s before the time limit, and `scancel --signal=USR1 JOB` does so on demand; preemption and
`scancel` send SIGTERM. Lightning's own SLURM handler saves a checkpoint *inside* the signal handler,
i.e. at an arbitrary point of a step on each rank (ranks can be in different collectives: a hang),
with the step's data only half accounted for. Here the handler only raises a flag; after each
training step the ranks agree (one tiny all-reduce) whether any rank was signalled, and if so all
save `last.ckpt` together, rank 0 requeues the job on SIGUSR1 (`scontrol requeue`; SLURM already
requeues preempted jobs itself), and training ends by raising `Preempted` when the next batch
would start (after Lightning has logged the step, before anything else runs: stopping through
`trainer.should_stop` would let epoch-end hooks save checkpoints that record the interrupted epoch
as finished). The requeued job starts the same script, and `trainer.resume` (auto under SLURM)
continues from that checkpoint.

`LastCheckpointAtEnd` makes `last.ckpt` the final state of every finished run (Lightning's
ModelCheckpoint leaves it at the last multiple of `checkpoint_every_n_steps`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import Callback

from aimv2.engine.run_dir import LAST

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised on every rank once the preemption checkpoint is written. A SystemExit with status 0:
    the process should end, successfully (SLURM requeues or ends the job), also under callers that do
    not catch it; `aimv2.pretraining.pretrain` catches it to say where the checkpoint is."""

    def __init__(self, step: int, path: Path, requeued: bool):
        super().__init__(0)
        self.step, self.path, self.requeued = step, path, requeued

    def __str__(self) -> str:
        return f"stopped by a signal at step {self.step}: saved {self.path}"


def slurm_job_id() -> Optional[str]:
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
        self.received: Optional[int] = None
        self._stop: Optional[Preempted] = None
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
        requeued = False
        if trainer.is_global_zero:
            log.warning("signal %s: saved %s at step %d; stopping", signal.Signals(signum).name, path, step)
            if self.slurm and signum == self.requeue_signal:
                requeued = requeue_slurm_job()
        self._stop = Preempted(step, path, requeued)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._stop is not None:
            raise self._stop

    def on_train_end(self, trainer, pl_module) -> None:
        if self._stop is not None:  # the signal came with the last step of the run
            raise self._stop


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
        self.saved_step: Optional[int] = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.saved_step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step > 0 and self.saved_step != trainer.global_step:
            trainer.save_checkpoint(self.checkpoint_dir / LAST, weights_only=False)
