"""``/healthz`` (the process answers) and ``/readyz`` (it can take work: catalog writable, spool
above the disk floor, broker reachable, storage not full: :mod:`node.lifecycle`). Both are open to
every caller and carry no patient data."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from node.http.context import NodeContext, node_context

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The node can take work", responses={503: {"description": "a check failed"}})
def readyz(ctx: Annotated[NodeContext, Depends(node_context)]) -> JSONResponse:
    floor = ctx.settings.node.min_free_mb * 2**20
    checks: dict[str, bool] = {}
    try:
        checks["catalog"] = ctx.catalog.writable()
    except Exception:  # a locked or broken catalog is "not ready", never a 500
        checks["catalog"] = False
    try:
        checks["spool"] = ctx.spool.free_bytes() >= floor
    except OSError:
        checks["spool"] = False
    try:
        checks["broker"] = ctx.broker_reachable()
    except Exception:
        checks["broker"] = False
    if ctx.storage is not None:  # above the high watermark with nothing left to purge: refusing instances
        checks["storage"] = not ctx.storage.refusing
    ok = all(checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)
