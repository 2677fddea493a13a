"""A real single-node SLURM cluster for tests, from Debian's packages, started and stopped by pid.

munged runs as the munge user with a fresh key; slurmctld and slurmd run in the foreground (`-D`)
as children of the test process, with every state, spool, log and pid path in one temporary
directory and ports picked free, so nothing outside that directory is touched and `stop()` can end
exactly the processes it started. The settings that mattered (SLURM 22.05, Debian 12): the host's
short name as SlurmctldHost and NodeName, auth/munge, SlurmUser=root, proctrack/linuxproc,
task/none, select/cons_tres with CR_Core, a RealMemory below the machine's, MpiDefault=none.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged")


def ensure_slurm_installed() -> Optional[str]:
    """None when the binaries are (or could be made) available; otherwise why not."""
    if all(shutil.which(b) for b in BINARIES):
        return None
    if os.geteuid() != 0:
        return "SLURM is not installed and installing it needs root"
    if shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:  # stale package lists: refresh once
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=900)
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0 or not all(shutil.which(b) for b in BINARIES):
        return f"could not install {' '.join(PACKAGES)}: {result.stderr.strip().splitlines()[-1:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return max(1000, total_kb // 1024 // 2)


class SlurmCluster:
    def __init__(self, cpus: int = 2):
        self.root = Path(tempfile.mkdtemp(prefix="aimv2-slurm-"))
        self.root.chmod(0o755)  # munged checks that every directory above its socket is traversable
        self.cpus, self.host = cpus, socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir()
        self.conf.write_text("\n".join([
            "ClusterName=aimv2test", f"SlurmctldHost={self.host}",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={r / 'munge' / 'munge.sock'}",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none",
            "ReturnToService=2", "SchedulerType=sched/backfill", "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none", "JobRequeue=1", "KillWait=5",
            f"NodeName={self.host} CPUs={self.cpus} RealMemory={_mem_mb()} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP", ""]))

    def _start_munge(self) -> None:
        d = self.root / "munge"
        d.mkdir()
        shutil.chown(d, "munge", "munge")
        d.chmod(0o711)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        self.procs.append(subprocess.Popen(
            ["munged", "-F", f"--key-file={key}", f"--socket={d / 'munge.sock'}", f"--pid-file={d / 'munged.pid'}",
             f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"],
            user="munge", group="munge", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self._wait(lambda: (d / "munge.sock").exists(), "munged socket")

    def start(self) -> "SlurmCluster":
        self._write_config()
        self._start_munge()
        for daemon in (["slurmctld", "-D", "-c"], ["slurmd", "-D"]):
            self.procs.append(subprocess.Popen([*daemon, "-f", str(self.conf)], env=self.env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle", "node idle")
        return self

    def run(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def _wait(self, ok, what: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ok():
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.2)
        logs = "\n".join(p.read_text()[-1500:] for p in (self.root / "log").glob("*.log"))
        raise RuntimeError(f"SLURM test cluster: no {what}\n{logs}")

    def stop(self) -> None:
        """Cancel jobs, then end exactly the daemons started here (SIGTERM, SIGKILL after 10 s)."""
        if self.conf.exists() and self.procs:
            self.run("scancel", "--full", "--signal=KILL", "--user=root")
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
        shutil.rmtree(self.root, ignore_errors=True)
