"""The node's ASGI app: every HTTP route of the node, one OpenAPI document (``/openapi.json``).

Routers (each its own module): health (``/healthz``, ``/readyz``); more are added by
:func:`create_app` as the node grows (DICOMweb under ``/dicom-web``, the API under ``/api/v1``,
``/metrics``). Routes get the node through :class:`node.http.context.NodeContext`.
"""

from __future__ import annotations

from fastapi import FastAPI

from node.http import health
from node.http.context import NodeContext
from node.http.errors import install_handlers
from node.version import software_version


def create_app(ctx: NodeContext) -> FastAPI:
    app = FastAPI(
        title="dicom-node",
        version=software_version(),
        description="DICOM AI analysis node: DICOMweb (STOW-RS, QIDO-RS, WADO-RS), REST API, health and metrics.",
    )
    app.state.node = ctx
    install_handlers(app)
    app.include_router(health.router)
    return app
