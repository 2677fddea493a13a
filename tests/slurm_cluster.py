"""A real SLURM cluster for tests, from Debian's packages, started and stopped by pid.

munged runs as the munge user with a fresh key; slurmctld and slurmd run in the foreground (`-D`)
as children of the test process, with every state, spool, log and pid path in one temporary
directory and ports picked free, so nothing outside that directory is touched and `stop()` can end
exactly the processes it started. The settings that mattered (SLURM 22.05, Debian 12): the host's
short name as SlurmctldHost and NodeName, auth/munge, SlurmUser=root, proctrack/linuxproc,
task/none, select/cons_tres with CR_Core, a RealMemory below the machine's, MpiDefault=none.

One node (`SlurmCluster()`): both daemons on this host. N nodes (`SlurmCluster(nodes=N)`):
slurmctld in the root network namespace, each slurmd in a network namespace of its own
(netns_hosts.py: its own IP on a private bridge, NodeAddr = that IP, the node names resolvable
inside the namespaces), started as `slurmd -D -N NAME` in its namespace with %n-named spool, pid
and log paths; the namespaces share the file system, so one munged socket serves them all.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from netns_hosts import NetnsHosts, netns_unavailable

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged")


def ensure_slurm_installed() -> str | None:
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
    """`nodes=0`: one node, this host (name = `hostname`). `nodes=N`: N nodes `aimv2n0..` of `cpus`
    CPUs each, one network namespace each; `self.hosts` says their namespaces and addresses."""

    def __init__(self, cpus: int = 2, nodes: int = 0):
        self.root = Path(tempfile.mkdtemp(prefix="aimv2-slurm-"))
        self.root.chmod(0o755)  # munged checks that every directory above its socket is traversable
        self.cpus, self.host = cpus, socket.gethostname().split(".")[0]
        self.nodes = [f"aimv2n{k}" for k in range(nodes)] or [self.host]
        self.hosts: NetnsHosts | None = NetnsHosts(self.nodes, self.root) if nodes else None
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []

    @staticmethod
    def unavailable(nodes: int = 0) -> str | None:
        """None when such a cluster can be started here (installing SLURM if need be); else why not."""
        return (netns_unavailable() if nodes else None) or ensure_slurm_installed()

    @property
    def env(self) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir()
        if self.hosts is None:
            controller, addrs = self.host, [None]
        else:  # slurmctld listens on every address; the namespaces reach it through the bridge's
            controller, addrs = f"{self.host}({self.hosts.gateway})", self.hosts.addrs
        mem = _mem_mb() // len(self.nodes)
        nodes = [
            f"NodeName={name}"
            + (f" NodeAddr={addr} NodeHostname={name}" if addr else "")
            + f" CPUs={self.cpus} RealMemory={mem} State=UNKNOWN"
            for name, addr in zip(self.nodes, addrs)
        ]
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=aimv2test",
                    f"SlurmctldHost={controller}",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={r / 'munge' / 'munge.sock'}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    # %n: the node's name, so that each slurmd of a many-node cluster has its own files
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool' / '%n'}",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
                    f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "SchedulerType=sched/backfill",
                    "JobCompType=jobcomp/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobRequeue=1",
                    "KillWait=5",
                    *nodes,
                    f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        for name in self.nodes:
            (r / "spool" / name).mkdir()

    def slurmd_log(self, node: str) -> Path:
        return self.root / "log" / f"slurmd-{node}.log"

    def _start_munge(self) -> None:
        d = self.root / "munge"
        d.mkdir()
        shutil.chown(d, "munge", "munge")
        d.chmod(0o711)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        self.procs.append(
            subprocess.Popen(
                [
                    "munged",
                    "-F",
                    f"--key-file={key}",
                    f"--socket={d / 'munge.sock'}",
                    f"--pid-file={d / 'munged.pid'}",
                    f"--log-file={d / 'munged.log'}",
                    f"--seed-file={d / 'munged.seed'}",
                ],
                user="munge",
                group="munge",
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        self._wait(lambda: (d / "munge.sock").exists(), "munged socket")

    def start(self) -> SlurmCluster:
        """Start the daemons; on failure stop whatever started (the caller's `stop()` is not reached)."""
        try:
            if self.hosts is not None:
                self.hosts.create()
            self._write_config()
            self._start_munge()
            daemons = [["slurmctld", "-D", "-c"]]
            if self.hosts is None:
                daemons.append(["slurmd", "-D"])
            else:  # the prefix execs slurmd: the pid kept is slurmd's
                daemons += [
                    [*self.hosts.exec_prefix(k), "slurmd", "-D", "-N", name] for k, name in enumerate(self.nodes)
                ]
            for daemon in daemons:
                self.procs.append(
                    subprocess.Popen(
                        [*daemon, "-f", str(self.conf)],
                        env=self.env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            self._wait(
                lambda: self.run("sinfo", "-h", "-N", "-o", "%T").stdout.split() == ["idle"] * len(self.nodes),
                "node idle",
            )
        except BaseException:
            self.stop()
            raise
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
        raise RuntimeError(f"SLURM test cluster: no {what}\n{self.daemon_logs()}")

    def daemon_logs(self, tail: int = 1500) -> str:
        """The end of each daemon's log (slurmctld, every slurmd, munged), for failure messages."""
        return "\n".join(f"== {p.name}\n{p.read_text()[-tail:]}" for p in sorted((self.root / "log").glob("*.log")))

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
        if self.hosts is not None:
            self.hosts.remove()
        shutil.rmtree(self.root, ignore_errors=True)


def wait_for(predicate, what: str, timeout: float, job_log=None):
    """The first true value of `predicate()`, polled every 0.2 s; after `timeout` s an AssertionError
    with the end of the job's log."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(
        f"timed out waiting for {what}\n" + (job_log.read_text()[-4000:] if job_log and job_log.exists() else "")
    )
