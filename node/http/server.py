"""Run an ASGI app on a uvicorn server in a background thread (``start`` returns once it listens);
HTTPS with a certificate and key (``http.tls``): TLS 1.2 or later, forward-secret AEAD suites."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from models.errors import ConfigError

log = logging.getLogger("node.http")

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
"""TLS 1.2 suites accepted (OpenSSL names): ephemeral key exchange, AEAD only; TLS 1.3 keeps its own."""


class HttpServer:
    def __init__(self, app: FastAPI, host: str, port: int, *, timeout_seconds: float = 60.0,
                 certfile: Path | None = None, keyfile: Path | None = None) -> None:
        self.host = host
        self.tls = certfile is not None
        self._config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
            timeout_keep_alive=int(max(1, min(timeout_seconds, 75))), server_header=False, proxy_headers=False,
            ssl_certfile=certfile, ssl_keyfile=keyfile, ssl_ciphers=TLS12_CIPHERS,
        )
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None
        self.port = port

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def _load_tls(self) -> None:
        """Load the certificate and key here (a bad file is a ConfigError in the caller) and refuse
        anything older than TLS 1.2 (uvicorn's own context would take what OpenSSL allows)."""
        try:
            self._config.load()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"http.tls: cannot load cert_file {self._config.ssl_certfile} with key_file "
                              f"{self._config.ssl_keyfile}: {getattr(exc, 'reason', None) or exc}") from None
        assert self._config.ssl is not None
        self._config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        self._config.ssl.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION

    def start(self, timeout: float = 30.0) -> None:
        """Bind the port here (an address in use raises OSError in the caller), then serve on a thread."""
        if self.tls:
            self._load_tls()
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
