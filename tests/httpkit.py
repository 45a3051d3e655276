"""The node's HTTP service in the test process: the real app (every router) on 127.0.0.1, a free port,
with an API token of its catalog (every route but /healthz and /readyz needs one)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI

from node.config import HttpSettings
from node.http.app import create_app
from node.http.auth import issue_token
from node.http.context import NodeContext
from node.http.server import HttpServer
from node.receive.scp import Receiver
from node.roles import Role
from testkit.harness import bearer

__all__ = ["NodeServer", "bearer", "serve"]


class NodeServer(HttpServer):
    """An :class:`HttpServer` with a ``token`` (of the role :func:`serve` was given) for its catalog."""

    def __init__(self, app: FastAPI, token: str, **kw: Any) -> None:
        super().__init__(app, "127.0.0.1", 0, **kw)
        self.token = token

    @property
    def auth(self) -> dict[str, str]:
        return bearer(self.token)

    @property
    def auth_line(self) -> bytes:
        """The header line for hand-written requests (``Authorization: Bearer ...\\r\\n``)."""
        return f"Authorization: Bearer {self.token}\r\n".encode()


@contextmanager
def serve(receiver: Receiver, *, role: Role | str = Role.ADMIN, **http: Any) -> Iterator[NodeServer]:
    """Serve the app for ``receiver`` (its catalog and spool) with a new token of ``role``; ``http``
    overrides HttpSettings fields."""
    settings = receiver.settings.model_copy(update={"http": HttpSettings(host="127.0.0.1", port=0, **http)})
    ctx = NodeContext(settings, receiver.catalog, receiver.spool, receiver, time.time, broker_reachable=lambda: True)
    server = NodeServer(create_app(ctx), issue_token(receiver.catalog, role),
                        timeout_seconds=settings.http.timeout_seconds)
    server.start()
    try:
        yield server
    finally:
        server.stop()
