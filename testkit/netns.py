"""A private test network of Linux network namespaces: several "hosts" on one machine (multi-host tests).

One "switch" namespace holds a Linux bridge; each host is a namespace joined to it by a veth pair, with
``lo`` up and one address from a private range reserved for tests (``10.213.<k>.0/24``, ``k`` from the
pid). Namespaces are named ``dn<pid>-<host>`` so parallel runs cannot collide. Nothing is added to the
root namespace (no address, route or firewall rule): the test process reaches a host's services from
inside it, with :meth:`Host.entered` (the calling thread joins the namespace for the block).

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and ``ip`` from iproute2; :class:`NetnsUnavailable`
otherwise. Cleanup: on leaving :func:`private_network`, at interpreter exit, and at the next start, a sweep
of the ``dn<pid>-`` namespaces of dead pids (a crashed run leaves nothing behind for long).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NETNS_DIR = Path("/run/netns")
PREFIX = "dn"
"""Namespace names are ``dn<pid>-<host>``; the sweep only ever touches this pattern."""
SUBNET_BASE = "10.213"
"""Test addresses are ``10.213.<k>.<n>/24`` (private, reserved for these tests on this machine)."""
_NAME = re.compile(r"^[a-z][a-z0-9]{0,9}$")
_STALE = re.compile(rf"^{PREFIX}(\d+)-[a-z0-9]+$")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no CAP_NET_ADMIN, no iproute2)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and out.returncode != 0:
        raise subprocess.CalledProcessError(out.returncode, ["ip", *args], out.stdout, out.stderr)
    return out


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def namespace_pids(ns: str) -> list[int]:
    """Processes whose network namespace is ``ns`` (``ip netns pids``)."""
    out = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in out.stdout.split() if p.isdigit()]


def kill_namespace(ns: str, timeout: float = 10) -> None:
    """SIGKILL every process of ``ns`` until none is left (children forked meanwhile included)."""
    deadline = time.monotonic() + timeout
    while (pids := namespace_pids(ns)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def delete_namespace(ns: str) -> None:
    """Kill its processes and delete it (its veth end goes with it)."""
    kill_namespace(ns)
    _ip("netns", "del", ns, check=False)


def sweep_stale() -> list[str]:
    """Delete the ``dn<pid>-*`` namespaces whose creating pid is dead; returns their names."""
    if not NETNS_DIR.is_dir():
        return []
    stale = [p.name for p in NETNS_DIR.iterdir()
             if (m := _STALE.match(p.name)) and not _pid_alive(int(m.group(1)))]
    for ns in sorted(stale, key=lambda n: n.endswith("-sw")):  # hosts first, switches last
        delete_namespace(ns)
    return stale


@dataclass
class Host:
    """One host of the test network: a namespace with one address."""

    name: str
    ns: str
    addr: str
    own_hostname: bool = False
    """Run its commands in their own UTS namespace with ``hostname`` = :attr:`name` (worker identities
    are ``<hostname>:<pid>``)."""

    @property
    def prefix(self) -> list[str]:
        """The command prefix that runs a command on this host (it execs: the pid stays the command's)."""
        cmd = ["ip", "netns", "exec", self.ns]
        if self.own_hostname:
            cmd += ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.name]
        return cmd

    def popen(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start ``cmd`` on this host."""
        return subprocess.Popen([*self.prefix, *cmd], **kw)

    def run(self, cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` on this host to completion (text output captured)."""
        kw = {"capture_output": True, "text": True, "timeout": 60, "check": False, **kw}
        return subprocess.run([*self.prefix, *cmd], **kw)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread is inside this host's network namespace for the block: sockets (and
        child processes) created meanwhile belong to it, e.g. to query a service bound to 127.0.0.1."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(NETNS_DIR / self.ns, os.O_RDONLY)
            try:
                _setns(target)
                try:
                    yield
                finally:
                    _setns(own)
            finally:
                os.close(target)
        finally:
            os.close(own)

    def pids(self) -> list[int]:
        """Every process running on this host."""
        return namespace_pids(self.ns)

    def kill_all(self) -> list[int]:
        """The host vanishes: SIGKILL every process in its namespace; returns the pids seen first."""
        pids = self.pids()
        kill_namespace(self.ns)
        return pids


class Network:
    """The switch and its hosts; build with :func:`private_network`."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.subnet = f"{SUBNET_BASE}.{self.pid % 250 + 1}"
        self.switch = f"{PREFIX}{self.pid}-sw"
        self.hosts: dict[str, Host] = {}
        self._closed = False

    @property
    def cidr(self) -> str:
        return f"{self.subnet}.0/24"

    def _create_switch(self) -> None:
        try:
            _ip("netns", "add", self.switch)
        except (subprocess.CalledProcessError, FileNotFoundError, OSError) as exc:
            detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
            raise NetnsUnavailable(f"cannot create network namespaces ({detail}): needs root / CAP_NET_ADMIN "
                                   "and iproute2") from exc
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def add_host(self, name: str, *, own_hostname: bool = False) -> Host:
        """A new host on the switch, with the next address."""
        if not _NAME.match(name) or name in self.hosts or name == "sw":
            raise ValueError(f"bad or duplicate host name {name!r} (a-z, 0-9, at most 10 characters)")
        ns = f"{PREFIX}{self.pid}-{name}"
        host = Host(name, ns, f"{self.subnet}.{len(self.hosts) + 2}", own_hostname)
        _ip("netns", "add", ns)
        self.hosts[name] = host
        port = f"p-{name}"
        # both ends are created directly in their namespaces: nothing appears in the root namespace
        _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", port, "master", "br0")
        _ip("-n", self.switch, "link", "set", port, "up")
        _ip("-n", ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return host

    def close(self) -> None:
        """Kill every process of every host and delete all the namespaces (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts.values():
            kill_namespace(host.ns)
        for host in self.hosts.values():
            _ip("netns", "del", host.ns, check=False)
        delete_namespace(self.switch)


@contextlib.contextmanager
def private_network(*hosts: str, own_hostname: Sequence[str] = ()) -> Iterator[Network]:
    """A switch and one host per name (those in ``own_hostname`` with their own host name); everything is
    killed and deleted on exit, also when the block raises, and at interpreter exit if the block never
    finished. Raises :class:`NetnsUnavailable` when namespaces cannot be created."""
    sweep_stale()
    net = Network()
    atexit.register(net.close)
    try:
        net._create_switch()
        for name in hosts:
            net.add_host(name, own_hostname=name in own_hostname)
        yield net
    finally:
        net.close()
        atexit.unregister(net.close)

