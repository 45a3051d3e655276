"""The node's ASGI app: every HTTP route of the node, one OpenAPI document (``/openapi.json``).

Routers (each its own module): health (``/healthz``, ``/readyz``); more are added by
:func:`create_app` as the node grows (DICOMweb under ``/dicom-web``, the API under ``/api/v1``,
``/metrics``). Routes get the node through :class:`node.http.context.NodeContext`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from node.http import api, api_actions, health, metrics, qido, stow, wado
from node.http.context import NodeContext
from node.http.errors import install_handlers
from node.metrics import NodeMetrics
from node.version import software_version

DOCS_ASSETS = "/docs/assets"


def swagger_ui_static() -> Path | None:
    """Swagger UI's files from the ``swagger-ui-py`` package (found without importing it), so that
    ``/docs`` works offline: nothing is loaded from a CDN."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(next(iter(spec.submodule_search_locations))) / "static"
    return static if (static / "swagger-ui-bundle.js").is_file() else None


def _add_docs(app: FastAPI) -> None:
    """Interactive docs at ``/docs`` served from the package's own Swagger UI files."""
    static = swagger_ui_static()
    if static is None:
        return
    app.mount(DOCS_ASSETS, StaticFiles(directory=static), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="dicom-node API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")


def create_app(ctx: NodeContext) -> FastAPI:
    app = FastAPI(
        title="dicom-node",
        version=software_version(),
        description="DICOM AI analysis node: DICOMweb (STOW-RS, QIDO-RS, WADO-RS), REST API, health and metrics.",
        docs_url=None,
        redoc_url=None,
    )
    if ctx.metrics is None:  # a context built without the node's registry (tests): one of the app's own
        ctx = replace(ctx, metrics=NodeMetrics(ctx.settings, ctx.catalog, ctx.spool))
    app.state.node = ctx
    install_handlers(app)
    _add_docs(app)
    app.include_router(health.router)
    app.include_router(stow.router)
    app.include_router(qido.router)
    app.include_router(wado.router)
    app.include_router(api.router)
    app.include_router(api_actions.router)
    app.include_router(metrics.router)
    return app
