"""A recording TCP proxy for tests: what a client (a remote worker) and a server (the node's HTTP port)
say to each other passes through it and is kept, per direction; it can also stop passing the server's
answers once the client has sent a given byte string (a worker that never hears back from its claim).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field

from testkit.harness import free_port


@dataclass
class RecordingProxy:
    """Listens on 127.0.0.1:``port`` and forwards each connection to 127.0.0.1:``target_port``."""

    target_port: int
    port: int = field(default_factory=free_port)
    hold_after: bytes | None = None
    """Once the client side has sent this, nothing more from the server reaches the client (connections stay
    open; what the client sends still goes through, the rest of that request included)."""
    to_client: bytearray = field(default_factory=bytearray)
    """Every byte the server sent towards the client."""
    to_server: bytearray = field(default_factory=bytearray)
    held: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _sockets: list[socket.socket] = field(default_factory=list)

    def start(self) -> RecordingProxy:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for s in [self._listener, *self._sockets]:
                with contextlib.suppress(OSError):
                    s.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, self.to_server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.to_client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        while not self._stop.is_set():
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            with self._lock:
                if record is self.to_client and self.held.is_set():
                    continue  # swallowed: the client waits for ever
                record += data
                if record is self.to_server and self.hold_after is not None and self.hold_after in record:
                    self.held.set()  # this request still goes through; its answer, and all after it, do not
            try:
                dst.sendall(data)
            except OSError:
                return
