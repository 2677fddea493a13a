"""Test hosts on one machine: N network namespaces on a private bridge, each its own IP and names.

`ip netns add` gives each host its own network stack (loopback up, one interface `aimv2net` with an
address on a free private /24); a bridge in the root namespace joins them and holds the subnet's
first address, so daemons in the root namespace (slurmctld) reach every host and the hosts reach
each other. Host names resolve on the hosts only: a program runs there as `nsenter --net=NS
unshare --mount` with a hosts file (the machine's /etc/hosts plus the hosts' names) bind-mounted
over /etc/hosts in its private mount namespace, so the machine's /etc is never edited. (Not
`ip netns exec`: it remounts /sys for the namespace, and slurmd then fails with "No filesystem
mounted on /sys/fs/cgroup ... Unable to initialize cgroup plugin".) Every name made here carries
one random id, and `remove()` deletes exactly those namespaces and links.
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

IFNAME = "aimv2net"  # the interface inside every namespace: one GLOO_SOCKET_IFNAME fits all hosts


def netns_unavailable() -> str | None:
    """None when network namespaces can be made here; otherwise why not."""
    if os.geteuid() != 0:
        return "network namespaces for test hosts need root"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command (iproute2, util-linux) to make and enter network namespaces"
    return None


class NetnsError(RuntimeError):
    """An `ip` command failed: this machine does not let the test make its hosts."""


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that overlaps no address or route of the root namespace."""
    used = []
    for line in (_ip("-4", "-o", "addr") + "\n" + _ip("-4", "route")).splitlines():
        for word in line.split():
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                pass
    used = [n for n in used if n.prefixlen > 0]  # not the default route
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{random.randrange(1, 255)}.{random.randrange(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet")


class NetnsHosts:
    """One namespace per name in `names` (host k: namespace aimv2-ID-k, address subnet.(k+2));
    their hosts file is written in `workdir`, which the caller removes."""

    def __init__(self, names: list[str], workdir: Path):
        self.id = secrets.token_hex(4)
        self.names = names
        self.netns = [f"aimv2-{self.id}-{k}" for k in range(len(names))]
        self.bridge = f"a2b{self.id}"
        self.hosts_file = workdir / "hosts"
        self.gateway, self.addrs = "", []  # set by create(): the bridge's address, host k's address
        self._made: list[tuple[str, str]] = []  # what exists, in order of creation: (kind, name)

    def create(self) -> NetnsHosts:
        self.subnet = _free_subnet()
        hosts = list(self.subnet.hosts())
        self.gateway = str(hosts[0])  # the bridge, in the root namespace
        self.addrs = [str(hosts[k + 1]) for k in range(len(self.names))]
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made.append(("link", self.bridge))
            _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            table = "".join(f"{a} {n}\n" for a, n in zip(self.addrs, self.names))
            self.hosts_file.write_text(Path("/etc/hosts").read_text().rstrip() + "\n" + table)
            for k, (ns, addr) in enumerate(zip(self.netns, self.addrs)):
                _ip("netns", "add", ns)
                self._made.append(("netns", ns))
                outer = f"a2v{self.id}{k}"
                _ip("link", "add", outer, "type", "veth", "peer", "name", IFNAME, "netns", ns)
                self._made.append(("link", outer))
                _ip("link", "set", outer, "master", self.bridge)
                _ip("link", "set", outer, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "addr", "add", f"{addr}/{self.subnet.prefixlen}", "dev", IFNAME)
                _ip("-n", ns, "link", "set", IFNAME, "up")
        except BaseException:
            self.remove()
            raise
        return self

    def exec_prefix(self, k: int) -> list[str]:
        """The command prefix that runs a program on host k; every step execs the next, so the pid
        of the process started is the program's."""
        return [
            "nsenter",
            f"--net=/run/netns/{self.netns[k]}",
            "unshare",
            "--mount",
            "sh",
            "-c",
            'mount --bind "$0" /etc/hosts && exec "$@"',
            str(self.hosts_file),
        ]

    def pids(self, k: int) -> list[int]:
        done = subprocess.run(["ip", "netns", "pids", self.netns[k]], capture_output=True, text=True, timeout=30)
        return [int(p) for p in done.stdout.split()]

    def remove(self) -> None:
        """Delete what create() made, newest first. Processes still inside a namespace can only have
        been started there by this object's user (its daemons' children, e.g. slurmstepd): they get
        SIGTERM, then SIGKILL after 5 s, by pid, before the namespace goes."""
        for k, ns in enumerate(self.netns):
            if ("netns", ns) not in self._made:
                continue
            for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
                for pid in self.pids(k):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.time() + wait
                while self.pids(k) and time.time() < deadline:
                    time.sleep(0.1)
        for kind, name in reversed(self._made):
            if kind == "netns":
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
            else:  # a veth (before its namespace: gVisor kept a deleted namespace's veth a while), the bridge
                subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=30)
        self._made = []
