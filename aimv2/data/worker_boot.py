"""Imported by the data workers' fork server only (aimv2.data.workers preloads it there): what every
data worker forked from that server starts with.

- SIGTERM and SIGUSR1 are ignored: they are meant for the ranks, which save a checkpoint at the next
  step boundary and stop (aimv2.engine.checkpointing); SLURM and `kill` send them to every process of
  the job, and a worker (or the server) ended by one would take the run down without its checkpoint.
  Workers still end with their rank: torch's worker loop watches its parent.
- SIGUSR2 prints every thread's stack, as in the ranks (aimv2.cli).
- torch, the training stream and the evaluation reader (with its tar access, aimv2.data.tar_ranges) are
  imported once here, so a worker starts in milliseconds.
"""

import faulthandler
import io
import signal

import torch  # noqa: F401  (preloaded for the workers)

import aimv2.data.every_sample  # noqa: F401
import aimv2.data.stream  # noqa: F401

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
try:
    faulthandler.register(signal.SIGUSR2, all_threads=True)
except (AttributeError, ValueError, io.UnsupportedOperation):  # a stderr without a file descriptor
    pass
