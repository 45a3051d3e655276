"""Fixtures of the multi-host tests: a private network of Linux network namespaces. Without the rights
to create one (not root, no CAP_NET_ADMIN) the tests are skipped, except under CI (``CI`` set), which
has them: there they fail."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from testkit.netns import NetnsUnavailable, Network, private_network
from testkit.postgres import postgres_bin
from tests.multihost.cluster import build_network


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: CI machines have the rights and the packages)")
    pytest.skip(reason)


@pytest.fixture
def netns_rights() -> None:
    """Skip (fail under CI) unless network namespaces can be created here."""
    missing = [exe for exe in ("ip", "unshare") if shutil.which(exe) is None]
    if missing:
        _unavailable(f"missing programs: {', '.join(missing)}")
    try:
        with private_network():
            pass
    except NetnsUnavailable as exc:
        _unavailable(str(exc))


@pytest.fixture
def net(netns_rights: None) -> Iterator[Network]:
    """The cluster's hosts (:func:`tests.multihost.cluster.build_network`), deleted afterwards."""
    missing = [exe for exe in ("redis-server", "Orthanc", "storescu") if shutil.which(exe) is None]
    if missing or postgres_bin() is None:
        _unavailable(f"missing programs: {', '.join(missing) or 'PostgreSQL server'}")
    with private_network() as network:
        build_network(network)
        yield network
