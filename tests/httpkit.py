"""The node's HTTP service in the test process: the real app (every router) on 127.0.0.1, a free port."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from node.config import HttpSettings
from node.http.app import create_app
from node.http.context import NodeContext
from node.http.server import HttpServer
from node.receive.scp import Receiver


@contextmanager
def serve(receiver: Receiver, **http: Any) -> Iterator[HttpServer]:
    """Serve the app for ``receiver`` (its catalog and spool); ``http`` overrides HttpSettings fields."""
    settings = receiver.settings.model_copy(update={"http": HttpSettings(host="127.0.0.1", port=0, **http)})
    ctx = NodeContext(settings, receiver.catalog, receiver.spool, receiver, time.time, broker_reachable=lambda: True)
    server = HttpServer(create_app(ctx), "127.0.0.1", 0, timeout_seconds=settings.http.timeout_seconds)
    server.start()
    try:
        yield server
    finally:
        server.stop()
