"""CPU work (training on the CPU, data workers): keep glibc's allocator from handing large tensors
back to the OS after every step.

By default glibc serves allocations above a (dynamic) threshold with fresh mmap()s and returns freed
heap to the OS; a training step allocates and frees the same activation and gradient buffers every
step, so every step pays page faults to zero-fill them again (measured on the 2-core bench machine:
a 32 MB fill_ inside cross_entropy's backward took 50 ms instead of ~5). Raising the mmap threshold
to glibc's maximum and never trimming keeps those pages mapped: the training step of the CPU bench
size got about 10% faster (benchmarks/results/train_step.md), and a data worker's torch.stack of a
32-image batch went from 14 ms to 1 ms (benchmarks/results/data_pipeline.md). The cost is that the
process keeps its peak heap, which a training process or a worker reaches anyway. Does nothing off
Linux/glibc. Applied by the `aimv2` command for every verb, by `pretrain()` on the CPU and by every
data worker.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

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
    ok = (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
          and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
          and mallopt(M_TOP_PAD, 256 * 1024 * 1024) == 1)
    if ok:
        _done = True
        log.debug("glibc malloc tuned for CPU training (mmap threshold 32 MB, no trimming)")
    return ok
