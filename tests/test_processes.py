"""A hung child process reports where it waits: `aimv2` answers SIGUSR2 with every thread's stack
(aimv2.cli), and aimv2.processes.run_with_deadline asks for them at the deadline, then kills the group."""

import subprocess
import sys

import pytest

from aimv2.processes import run_with_deadline


@pytest.mark.slow
def test_a_hung_aimv2_command_prints_its_stacks_and_is_killed_with_its_children(tmp_path):
    # `aimv2 report` whose work never ends, with a child process that would outlive it if only the
    # main process were killed.
    hang = (
        "import subprocess, sys, time; import aimv2.commands.report as verb; "
        "verb.run = lambda args: (subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']), "
        "time.sleep(600)); from aimv2.cli import main; main(['report', 'RUN'])"
    )
    done = run_with_deadline([sys.executable, "-c", hang], cwd=tmp_path, timeout=15)
    assert done.hung and done.returncode == -9
    assert "Current thread" in done.stderr and "<lambda>" in done.stderr  # faulthandler: where it waits
    children = subprocess.run(["pgrep", "-f", "time.sleep.600."], capture_output=True, text=True).stdout.split()
    assert not children, "the command's child process outlived it"


def test_a_command_within_its_deadline_returns_its_output(tmp_path):
    code = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"
    done = run_with_deadline([sys.executable, "-c", code], cwd=tmp_path, timeout=30)
    assert (done.hung, done.returncode, done.stdout, done.stderr) == (False, 3, "out\n", "err\n")
