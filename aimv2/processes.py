"""Child processes that cannot hang their caller: a run past its deadline prints every process's
thread stacks (SIGUSR2, which every `aimv2` process answers: aimv2.cli) and is then killed with all
its ranks and data workers, so a hang reports where it waits instead of waiting forever."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

STACKS_WAIT_S = 5  # for every process to print its stacks before the group is killed


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str  # with the stacks of every process when hung
    hung: bool  # still running at the deadline; killed


def run_with_deadline(cmd: Sequence[str], *, timeout: float, cwd=None, env: Optional[dict] = None) -> Finished:
    """Run `cmd` in a process group of its own, capturing its output as text. Nothing it started
    outlives the call: ranks or data workers left behind by its main process are killed too."""
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
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
