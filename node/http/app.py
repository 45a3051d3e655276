"""The node's ASGI app: every HTTP route of the node, one OpenAPI document (``/openapi.json``).

Routers (each its own module): health (``/healthz``, ``/readyz``), DICOMweb under ``/dicom-web``,
the API under ``/api/v1`` (reads, actions, admin), ``/metrics``, the docs, the dashboard at ``/``
(:mod:`node.http.ui`). Every router but health and the dashboard's login and assets is included with
the permission its routes require (:data:`PROTECTED`, :mod:`node.http.auth`). Routes get the node
through :class:`node.http.context.NodeContext`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from node.http import (
    admin,
    api,
    api_actions,
    api_batch,
    api_ops,
    api_rules,
    api_storage,
    api_worker,
    health,
    metrics,
    qido,
    stow,
    ui,
    wado,
)
from node.http.audit import AuditMiddleware
from node.http.auth import Authenticator, require, require_page
from node.http.context import NodeContext
from node.http.errors import Problem, install_handlers
from node.metrics import NodeMetrics
from node.roles import Permission
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


def _docs_router(app: FastAPI) -> APIRouter:
    """``/openapi.json`` and the interactive docs at ``/docs``, served from the package's own Swagger UI
    files (its assets under ``/docs/assets``): ordinary routes, so that they take a permission too."""
    router = APIRouter(include_in_schema=False)

    @router.get("/openapi.json")
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    static = swagger_ui_static()
    if static is None:
        return router
    assets = {p.relative_to(static).as_posix() for p in static.rglob("*") if p.is_file()}

    @router.get("/docs")
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="dicom-node API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
                                   swagger_ui_parameters={"persistAuthorization": False})

    @router.get(DOCS_ASSETS + "/{name:path}")
    def asset(name: str) -> FileResponse:
        if name not in assets:  # only the package's files, by name: no path is built from the request
            raise Problem(404, "not-found")
        return FileResponse(static / name)

    return router


PROTECTED: tuple[tuple[APIRouter, Permission], ...] = (
    (stow.router, Permission.DICOMWEB_STORE),
    (qido.router, Permission.DICOMWEB_READ),
    (wado.router, Permission.DICOMWEB_READ),
    (api.router, Permission.API_READ),
    (api_ops.router, Permission.API_READ),  # queues, workers, peers, hourly stats
    (api_actions.router, Permission.API_ACTIONS),
    (api_batch.router, Permission.API_READ),  # retrospective batches: progress
    (api_batch.actions_router, Permission.API_ACTIONS),  # create, cancel
    (api_rules.router, Permission.API_READ),  # the rule dry run changes nothing
    (api_storage.router, Permission.API_READ),  # usage and the purge plan
    (api_storage.admin_router, Permission.ADMIN),  # the purge
    (admin.router, Permission.ADMIN),
    (api_worker.router, Permission.WORKER),  # remote workers: claim, inputs, results, heartbeats
    (metrics.router, Permission.METRICS),
)
"""Each router and the permission every one of its routes requires (the docs: ``docs``)."""


def create_app(ctx: NodeContext, *, auth: Authenticator | None = None) -> FastAPI:
    """The app of ``ctx``; ``auth``: how callers are authenticated (default: from ``ctx.settings.http``,
    API tokens in ``ctx.catalog`` and OIDC when configured, its keys read here)."""
    app = FastAPI(
        title="dicom-node",
        version=software_version(),
        description="DICOM AI analysis node: DICOMweb (STOW-RS, QIDO-RS, WADO-RS), REST API, health and metrics.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served by _docs_router, behind the docs permission
    )
    if ctx.metrics is None:  # a context built without the node's registry (tests): one of the app's own
        ctx = replace(ctx, metrics=NodeMetrics(ctx.settings, ctx.catalog, ctx.spool))
    app.state.node = ctx
    app.state.auth = auth if auth is not None else Authenticator(ctx.settings.http, ctx.catalog, ctx.clock)
    install_handlers(app)
    app.add_middleware(AuditMiddleware)  # reports auditable requests to ctx.on_audit
    app.include_router(health.router)  # open: /healthz, /readyz
    for router, permission in PROTECTED:
        app.include_router(router, dependencies=[Depends(require(permission))])
    app.include_router(_docs_router(app), dependencies=[Depends(require(Permission.DOCS))])
    app.include_router(ui.public_router)  # open: /login, /logout, the dashboard's CSS and JavaScript
    for pages in (ui.pages_router, ui.ops_router):  # the dashboard: a browser without a session goes to /login
        app.include_router(pages, dependencies=[Depends(require_page(Permission.API_READ))])
    return app
