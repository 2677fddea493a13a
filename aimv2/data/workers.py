"""Where data-loader workers come from: a fork server, not a fork of the training process.

By the time a training process starts its data workers it has threads (gloo, the autograd engine,
loggers, queue feeders of the last epoch's workers). Forking a multithreaded CPython 3.11 process can
leave the child blocked forever on a lock another thread held at the moment of the fork
(PyOS_AfterFork_Child takes the runtime's thread-list lock before reinitializing it). Seen here: a
rank's first data worker stuck in _PyThreadState_DeleteExcept right after its fork, the rank waiting
for its first batch, the other rank in a collective: DDP hung until its deadline. Workers forked
from a fork server, a single-threaded process started once per training process, cannot inherit
such a lock. The server preloads aimv2.data.worker_boot (signals, torch, the stream modules), so a
worker starts in milliseconds; the dataset reaches it pickled.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext
from typing import Optional

PRELOAD = ["aimv2.data.worker_boot"]


def worker_context(num_workers: int) -> Optional[BaseContext]:
    """The multiprocessing context of a DataLoader with `num_workers` workers (None: no workers)."""
    if num_workers <= 0:
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context
