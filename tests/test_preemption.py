"""The end of a preempted run (aimv2.engine.checkpointing.fit_until_signal), in one process: the
requeue is the last thing rank 0 does, and the SIGTERM that SLURM sends every process of a requeued
job right after it only sets the flag, so the stop line still reaches the job's log and `Preempted`
(a SystemExit with status 0) goes on up, past anything a caller would run on a finished run."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

import aimv2.engine.checkpointing as checkpointing
from aimv2.engine.checkpointing import Preempted, PreemptionCheckpoint, fit_until_signal


def stopped_trainer(callback: PreemptionCheckpoint, requeue: bool):
    def fit():
        assert signal.getsignal(signal.SIGUSR1) == callback._handler  # installed before fit starts
        raise Preempted(7, Path("/runs/r/checkpoints/last.ckpt"), requeue=requeue)

    return SimpleNamespace(callbacks=[callback], is_global_zero=True), fit


@pytest.mark.parametrize("requeue", [True, False])
def test_rank_zero_requeues_last_and_survives_the_sigterm_that_follows(monkeypatch, capsys, requeue):
    callback = PreemptionCheckpoint("/runs/r/checkpoints", slurm=True)
    events = []

    def scontrol_requeue():  # what SLURM does next: SIGTERM to every process of the job
        events.append("requeue")
        os.kill(os.getpid(), signal.SIGTERM)
        return True

    monkeypatch.setattr(checkpointing, "requeue_slurm_job", scontrol_requeue)
    monkeypatch.setattr(checkpointing, "wait_for_every_rank", lambda: events.append("barrier"))
    before = signal.getsignal(signal.SIGTERM)
    trainer, fit = stopped_trainer(callback, requeue)
    with pytest.raises(Preempted) as stop:
        fit_until_signal(trainer, fit)
    assert stop.value.code == 0 and stop.value.requeued is requeue
    assert events == (["barrier", "requeue"] if requeue else ["barrier"])  # every rank torn down first
    assert callback.received == (signal.SIGTERM if requeue else None)  # caught: the process lived on
    then = "the SLURM job was requeued and will continue from it" if requeue else "continue with trainer.resume=auto"
    assert capsys.readouterr().out == f"stopped by a signal at step 7: saved /runs/r/checkpoints/last.ckpt; {then}\n"
    assert signal.getsignal(signal.SIGTERM) == before  # given back once it is all done


def test_other_ranks_neither_print_nor_requeue(monkeypatch, capsys):
    callback = PreemptionCheckpoint("/runs/r/checkpoints", slurm=True)
    monkeypatch.setattr(checkpointing, "requeue_slurm_job", lambda: pytest.fail("only rank 0 requeues"))
    monkeypatch.setattr(checkpointing, "wait_for_every_rank", lambda: None)
    trainer, fit = stopped_trainer(callback, requeue=True)
    trainer.is_global_zero = False
    with pytest.raises(Preempted) as stop:
        fit_until_signal(trainer, fit)
    assert stop.value.requeued is False and capsys.readouterr().out == ""


def test_a_finished_fit_returns_and_gives_the_signals_back():
    callback = PreemptionCheckpoint("/runs/r/checkpoints", slurm=False)
    before = signal.getsignal(signal.SIGUSR1)
    assert fit_until_signal(SimpleNamespace(callbacks=[callback], is_global_zero=True), lambda: None) is None
    assert signal.getsignal(signal.SIGUSR1) == before
