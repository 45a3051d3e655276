"""TCP_NODELAY on every DICOM association the node opens or accepts.

pynetdicom leaves Nagle's algorithm on. A C-STORE is a command PDU followed by data PDUs; with
Nagle the last short segment waits for the peer's delayed ACK (up to 40 ms on Linux), so every
request/response round trip stalls: sending 100 CT slices to Orthanc on loopback took 2.19 s
with Nagle and 0.70 s without (``bench/send_results.py`` has the full comparison). The same
reason makes dcmtk and Orthanc honour ``TCP_NODELAY=1``.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from pynetdicom import evt


def set_nodelay(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler: disable Nagle on the association's socket (best effort)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):  # a socket already closed by the peer
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


NODELAY_HANDLERS: list[Any] = [(evt.EVT_CONN_OPEN, set_nodelay)]
"""Pass in ``evt_handlers`` to ``AE.associate`` / ``AE.start_server`` (with the other handlers)."""
