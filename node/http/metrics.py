"""``/metrics``: the node's Prometheus metrics in the text exposition format (:mod:`node.metrics`).

Open like ``/healthz``: it carries counts, durations and names of models, destinations and AEs,
never patient data."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from node.http.context import NodeContext, node_context
from node.http.errors import Problem

router = APIRouter(tags=["metrics"])


@router.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "the metrics"}})
def metrics(ctx: Annotated[NodeContext, Depends(node_context)]) -> Response:
    if ctx.metrics is None:
        raise Problem(404, "not-found", "this app has no metrics registry")
    return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
