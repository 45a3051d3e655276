"""What the HTTP routes read and act through: one object, built by the node service, passed to
:func:`node.http.app.create_app` (no module-level state)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from node.catalog import Catalog
from node.config import Settings
from node.http.audit import HttpAudited
from node.lifecycle.loop import StorageKeeper
from node.metrics import NodeMetrics
from node.receive.scp import Receiver
from node.spool import Spool


@dataclass(frozen=True)
class NodeContext:
    settings: Settings
    catalog: Catalog
    spool: Spool
    receiver: Receiver
    clock: Callable[[], float]
    broker_reachable: Callable[[], bool]
    """Whether the queue broker answers (``/readyz``)."""
    metrics: NodeMetrics | None = None
    """The node's metrics registry (``/metrics``), fed by the receiver's hooks; None: ``create_app``
    gives the app one of its own (catalog metrics only)."""
    on_audit: Callable[[HttpAudited], None] | None = None
    """Hears of every auditable request (:class:`node.http.audit.AuditMiddleware`); the node service
    passes its audit trail in. None: nothing is reported."""
    storage: StorageKeeper | None = None
    """The node's storage lifecycle (``/api/v1/storage``, the ``storage`` check of ``/readyz``); None:
    reads are computed on the spot and a real purge is refused (no receiver to coordinate with)."""


def node_context(request: Request) -> NodeContext:
    """FastAPI dependency: the context the app was built with."""
    ctx = request.app.state.node
    assert isinstance(ctx, NodeContext)
    return ctx
