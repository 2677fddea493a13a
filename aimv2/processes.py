"""What every aimv2 process sets up about its OS, and child processes that cannot hang their caller.

- `tune_cpu_allocator`: CPU work (training on the CPU, data workers) keeps glibc's allocator from
  handing large tensors back to the OS after every step. A training step allocates and frees the same
  activation and gradient buffers every step; by default glibc serves them with fresh mmap()s and
  returns the freed heap, so every step pays page faults to zero-fill them again. Raising the mmap
  threshold to glibc's maximum and never trimming keeps those pages mapped (figures:
  benchmarks/results/train_step.md, data_pipeline.md); the process keeps its peak heap, which a
  training process or a worker reaches anyway. Does nothing off Linux/glibc. Applied by the `aimv2`
  command for every verb, by `pretrain()` on the CPU and by every data worker.
- `run_with_deadline`: a child run past its deadline prints every process's thread stacks (SIGUSR2,
  which every `aimv2` process answers: aimv2.cli) and is then killed with all its ranks and data
  workers, so a hang reports where it waits instead of waiting forever.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

STACKS_WAIT_S = 5  # for every process to print its stacks before the group is killed


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str  # with the stacks of every process when hung
    hung: bool  # still running at the deadline; killed


def run_with_deadline(cmd: Sequence[str], *, timeout: float, cwd=None, env: dict | None = None) -> Finished:
    """Run `cmd` in a process group of its own, capturing its output as text. Nothing it started
    outlives the call: ranks or data workers left behind by its main process are killed too."""
    proc = subprocess.Popen(
        list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    hung = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hung = True
        _signal_group(proc.pid, signal.SIGUSR2)
        time.sleep(STACKS_WAIT_S)
        _signal_group(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    finally:
        _signal_group(proc.pid, signal.SIGKILL)
    return Finished(proc.returncode, out, err, hung)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the whole group has already exited
        pass


log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # from glibc's malloc.h
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
_done = False


def tune_cpu_allocator() -> bool:
    """Apply the settings once per process (forked data workers inherit them); True when applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = (
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
        and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
        and mallopt(M_TOP_PAD, 256 * 1024 * 1024) == 1
    )
    if ok:
        _done = True
        log.debug("glibc malloc tuned for CPU training (mmap threshold 32 MB, no trimming)")
    return ok
