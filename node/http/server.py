"""Run an ASGI app on a uvicorn server in a background thread (``start`` returns once it listens)."""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("node.http")


class HttpServer:
    def __init__(self, app: FastAPI, host: str, port: int, *, timeout_seconds: float = 60.0) -> None:
        self.host = host
        self._config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
            timeout_keep_alive=int(max(1, min(timeout_seconds, 75))), server_header=False, proxy_headers=False,
        )
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Bind the port here (an address in use raises OSError in the caller), then serve on a thread."""
        sock = socket.create_server((self.host, self._config.port), backlog=self._config.backlog)
        sock.set_inheritable(False)
        self.port = int(sock.getsockname()[1])
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OSError(f"HTTP service did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        log.info("HTTP service listening on %s", self.url)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
