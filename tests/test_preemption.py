"""The end of a preempted run (aimv2.engine.checkpointing.fit_until_signal), in one process: the
requeue is the last thing rank 0 does, and the SIGTERM that SLURM sends every process of a requeued
job right after it only sets the flag, so the stop line still reaches the job's log and `Preempted`
(a SystemExit with status 0) goes on up, past anything a caller would run on a finished run. The
barrier before the requeue, in real process groups: every rank arrives, or rank 0 gives up on a missing
one after the timeout; on NCCL it names its device and warns nothing (gpu)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

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


def run_barrier_rank(rank: int, world: int, port: int, backend: str, late_s: float, out) -> None:
    if backend == "nccl":
        torch.cuda.set_device(0)
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    time.sleep(late_s if rank == 1 else 0)
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpointing.wait_for_every_rank(timeout_s=2.0)
    out.put((rank, round(time.monotonic() - start, 1), [str(w.message) for w in caught]))
    if rank == 1:
        time.sleep(3 if late_s else 0)  # the late rank outlives rank 0's wait instead of breaking the group


def run_ranks(backend: str, late_s: float, world: int = 2) -> list:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=run_barrier_rank, args=(r, world, port, backend, late_s, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    waited = results[0][1]
    assert (waited >= 1.9) if late_s else (waited < 1.5), results  # rank 0's wait: the timeout, or none
    return results


@pytest.mark.slow  # 2 x 2 spawned processes that import torch
@pytest.mark.parametrize("late_s", [0.0, 6.0])
def test_the_barrier_waits_for_every_rank_and_gives_up_on_a_missing_one(late_s):
    """Two gloo processes: both arrive and neither waits long; or rank 1 is late past the timeout, and
    rank 0 goes on after 2 s instead of keeping the job from its requeue."""
    run_ranks("gloo", late_s)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_barrier_on_nccl_names_its_device_and_warns_nothing():
    results = run_ranks("nccl", 0.0, world=1)  # NCCL takes one rank per GPU; a 1-GPU machine has one
    assert all(not caught for _, _, caught in results), results
