"""Where data-loader workers come from in a distributed rank: a fork server, not a fork of the rank.

A DDP/FSDP rank has threads by the time it starts its data workers (gloo, c10d, the autograd engine
entering Python). Forking a multithreaded CPython 3.11 process can leave the child blocked forever on
a lock another thread held at the moment of the fork (PyOS_AfterFork_Child takes the runtime's
thread-list lock before reinitializing it). Seen here: a rank's first data worker stuck in
_PyThreadState_DeleteExcept right after its fork, the rank waiting for its first batch, the other
rank in a collective: DDP hung until its deadline. Workers forked from a fork server, a
single-threaded process started once per rank, cannot inherit such a lock. A process without a
process group keeps the plain fork: it was never seen to hang (hundreds of runs here), and a fork
server costs each training process about 5 s (a fresh interpreter importing torch and the dataset's
modules), which single-process runs (and the test suite) would pay for nothing.

The dataset reaches each worker pickled, so the server preloads what unpickling it imports (found
by pickling it once: the modules its pickle names, e.g. a tokenizer's), besides
aimv2.data.worker_boot (signals, torch, the stream modules): a worker then starts in milliseconds
instead of importing transformers again every epoch. Main modules must be import-safe
(`if __name__ == "__main__":`), as with any non-fork start method (Python 3.14's default).
"""

from __future__ import annotations

import multiprocessing
import pickle
import pickletools
import signal
from multiprocessing.context import BaseContext

PRELOAD = ["aimv2.data.worker_boot"]


def worker_context(num_workers: int, dataset: object = None) -> BaseContext | None:
    """The multiprocessing context of a DataLoader with `num_workers` workers over `dataset`: a fork
    server in a process group's rank (its preload takes effect when it starts, at the rank's first
    worker), else None (the default start method)."""
    if num_workers <= 0 or not _in_process_group():
        return None  # the default start method (fork on Linux before Python 3.14)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD + (modules_to_load(dataset) if dataset is not None else []))
    return context


def modules_to_load(obj: object) -> list[str]:
    """The modules that unpickling `obj` imports: the GLOBAL references of its protocol-2 pickle
    (which names module and attribute in one opcode). [] if it does not pickle (the loader then
    reports that itself)."""
    try:
        data = pickle.dumps(obj, protocol=2)
    except Exception:  # noqa: BLE001  (any pickling error: nothing to preload)
        return []
    modules = {arg.split(" ")[0] for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    return sorted(m for m in modules if m != "__main__" and not m.startswith("__mp_main__"))


def _in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def ignore_stop_signals(worker_id: int) -> None:
    """A training loader's worker_init_fn: SIGTERM and SIGUSR1 are the rank's to act on (it saves at the
    next step boundary and stops: aimv2.engine.checkpointing). SLURM and `kill` send them to every process
    of a job, and a worker ended by one ends the run without its checkpoint (seen in benchmarks/chaos.py:
    "DataLoader worker ... exited unexpectedly"). The worker still ends with its rank."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
