"""Separate network hosts on this machine for the multi-node tests.

Each host is a network namespace with its own address on a private bridge, its own host
name (a UTS namespace) and its own /etc/hosts (a mount namespace with a bind mount)
written as Debian writes it: the host's own name on 127.0.1.1, the other hosts by their
addresses (as a cluster's DNS would give them). A quiet `sleep` process holds each host's
UTS and mount namespaces; `Host.enter` (nsenter into it) runs a program on that host.

    with NetHosts(2, tmp_dir) as hosts:   # hosts.hosts: [Host("node0", "10.x.y.1", ...), ...]
        subprocess.run([*hosts.hosts[1].enter, "hostname"])

The bridge lives in a namespace of its own (the "switch"): nothing is added to this
machine's own network, and nothing is routed outside the namespaces. Teardown kills every
process left in the hosts' namespaces (ours: the daemons and jobs we started there),
deletes the namespaces (their veth links go with them) and checks that none of it is left.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import List

import pytest

from slurm_cluster import Host, apt_install

TOOLS = ["ip", "unshare", "nsenter"]


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip()}")


def netns_pids(ns: str) -> List[int]:
    proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in proc.stdout.split()]


def our_namespaces(prefix: str) -> List[str]:
    proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in proc.stdout.splitlines()
            if line.split() and line.split()[0].startswith(prefix)]


def skip_unless_namespaces_work() -> None:
    """Install iproute2/util-linux when missing; skip (with the reason) where this machine
    cannot make network namespaces."""
    apt_install("iproute2/util-linux", ["iproute2", "util-linux"], TOOLS)
    if os.geteuid() != 0:
        pytest.skip("the multi-host tests create network namespaces, which needs root")
    probe = f"ppdpnprobe{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"network namespaces are not permitted here (`ip netns add` said: "
                    f"{proc.stderr.strip()})")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)


class NetHosts:
    """N hosts (namespaces) on one /24 behind a bridge; see the module docstring."""

    def __init__(self, count: int, root: Path):
        self.count = count
        self.root = Path(root)
        self.prefix = f"ppdpn{os.getpid()}x{random.randrange(10**6)}"
        self.subnet = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
        self.switch = f"{self.prefix}sw"
        self.hosts: List[Host] = []
        self.anchors: List[subprocess.Popen] = []

    def namespace(self, index: int) -> str:
        return f"{self.prefix}h{index}"

    def hosts_file(self, index: int) -> str:
        others = [f"{self.subnet}.{j + 1}\tnode{j}" for j in range(self.count) if j != index]
        return ("127.0.0.1\tlocalhost\n"
                f"127.0.1.1\tnode{index}\n"  # Debian's installer writes the host name so
                "\n# the other hosts, as the cluster's DNS would give them\n"
                + "\n".join(others) + "\n")

    def __enter__(self) -> "NetHosts":
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i in range(self.count):
            self.hosts.append(self._create_host(i))

    def _create_host(self, i: int) -> Host:
        ns, addr = self.namespace(i), f"{self.subnet}.{i + 1}"
        _ip("netns", "add", ns)
        # Both ends are created inside their namespaces: this machine's own network sees none.
        _ip("link", "add", "name", f"port{i}", "netns", self.switch, "type", "veth",
            "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.switch, "link", "set", f"port{i}", "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        hosts = self.root / f"hosts.node{i}"
        hosts.write_text(self.hosts_file(i))
        ready = self.root / f"ready.node{i}"
        # The anchor: sets the name and /etc/hosts in new UTS and mount namespaces (private
        # propagation: the bind mount never reaches this machine's own /etc), then sleeps.
        # nsenter, not `ip netns exec`: that remounts /sys, and slurmd wants /sys/fs/cgroup.
        anchor = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--mount", "--propagation", "private",
             "sh", "-c", f'hostname node{i} && mount --bind "$0" /etc/hosts && touch "$1" '
                         f'&& exec sleep infinity', str(hosts), str(ready)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.anchors.append(anchor)
        deadline = time.monotonic() + 20
        while not ready.exists():
            if anchor.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"host node{i} did not start: {anchor.stderr.read().decode()}")
            time.sleep(0.05)
        enter = ("nsenter", f"--target={anchor.pid}", "--net", "--uts", "--mount", "--")
        return Host(f"node{i}", addr, enter)

    def kill_host(self, index: int) -> List[int]:
        """SIGKILL every process on host `index` but its anchor: a node that dies."""
        keep = self.anchors[index].pid if index < len(self.anchors) else -1
        pids = [p for p in netns_pids(self.namespace(index)) if p != keep]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def close(self) -> None:
        """Kill what runs in the namespaces, delete them, and check nothing is left."""
        names = [self.namespace(i) for i in range(self.count)] + [self.switch]
        for ns in names:
            for pid in netns_pids(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for anchor in self.anchors:
            try:
                anchor.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while any(netns_pids(ns) for ns in names) and time.monotonic() < deadline:
            time.sleep(0.1)
        for ns in our_namespaces(self.prefix):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        left = self.leftovers()
        if left:
            raise RuntimeError(f"the test hosts left things behind: {left}")

    def leftovers(self) -> List[str]:
        """Namespaces, processes and mounts of these hosts that still exist."""
        left = [f"namespace {ns}" for ns in our_namespaces(self.prefix)]
        left += [f"process {a.pid}" for a in self.anchors if a.poll() is None]
        mounts = Path("/proc/self/mountinfo").read_text()
        left += [f"mount of {line.split()[4]}" for line in mounts.splitlines()
                 if self.prefix in line or str(self.root) in line]
        return left
