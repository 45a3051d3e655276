"""The private test network itself (:mod:`testkit.netns`): hosts reach each other and have their own
host names, the root namespace gains nothing, a vanished host's processes are all gone, and every
namespace is deleted on exit, also after a failure, and by the sweep when its run died."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.harness import wait_for
from testkit.netns import NETNS_DIR, PREFIX, Network, private_network, sweep_stale

pytestmark = pytest.mark.timeout(60)

SERVER = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 5555))
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(socket.gethostname().encode())
    c.close()
"""


def _namespaces() -> set[str]:
    return {p.name for p in NETNS_DIR.iterdir()} if NETNS_DIR.is_dir() else set()


def _root_links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout


def test_hosts_talk_across_the_switch_and_vanish(net: Network) -> None:
    w1, scanner = net.hosts["w1"], net.hosts["scanner"]
    assert w1.addr != scanner.addr and w1.addr.startswith("10.213.")
    assert f"{PREFIX}{net.pid}-" not in _root_links()  # both veth ends live in namespaces
    server = w1.popen([sys.executable, "-c", SERVER, w1.addr])
    child = w1.popen(["sleep", "300"])

    def hello() -> bytes:
        try:
            with scanner.entered(), socket.create_connection((w1.addr, 5555), timeout=2) as c:
                return c.recv(64)
        except OSError:
            return b""

    assert wait_for(hello, 20, what="w1 reachable from scanner") == b"w1"  # its own host name
    assert {server.pid, child.pid} <= set(w1.pids())
    assert scanner.pids() == []
    killed = w1.kill_all()
    assert {server.pid, child.pid} <= set(killed)
    assert server.wait(timeout=10) == -9 and child.wait(timeout=10) == -9
    assert w1.pids() == []
    assert hello() == b""


@pytest.mark.usefixtures("netns_rights")
def test_namespaces_are_deleted_after_a_failure_and_by_the_sweep() -> None:
    names: set[str] = set()
    with pytest.raises(RuntimeError, match="boom"), private_network("a", "b") as network:
        names = {h.ns for h in network.hosts.values()} | {network.switch}
        assert names <= _namespaces()
        sleeper = network.hosts["a"].popen(["sleep", "300"])
        raise RuntimeError("boom")
    assert sleeper.wait(timeout=10) == -9
    assert names and not names & _namespaces()
    # a run that died without cleaning up: its pid no longer exists
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Network(pid=dead.pid)
    try:
        stale._create_switch()
        orphan = stale.add_host("x").popen(["sleep", "300"])
        assert {f"{PREFIX}{dead.pid}-sw", f"{PREFIX}{dead.pid}-x"} <= _namespaces()
        swept = sweep_stale()
        assert {f"{PREFIX}{dead.pid}-sw", f"{PREFIX}{dead.pid}-x"} <= set(swept)
        assert not {f"{PREFIX}{dead.pid}-sw", f"{PREFIX}{dead.pid}-x"} & _namespaces()
        assert orphan.wait(timeout=10) == -9
    finally:
        stale.close()
    assert not Path(NETNS_DIR / f"{PREFIX}{dead.pid}-x").exists()
