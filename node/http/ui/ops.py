"""Dashboard pages about the node: operations (``/ops``: queue depth, workers, disk by area, peers,
retrospective batches (counts only), turnaround and throughput plots of the last 24 h) and the rule
dry run (``/rules``)."""

from __future__ import annotations

import time
from typing import Annotated, cast

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from node.batch_store import BatchStore
from node.http.api import Ctx
from node.http.api_batch import batches_out
from node.http.ui.render import is_fragment, page
from node.http.ui.svg import Line, line_chart
from node.lifecycle.usage import AREAS, DiskUsage, disk_usage
from node.overview_ops import hourly_stats, queue_depths, worker_facts

router = APIRouter(include_in_schema=False)

BATCHES_SHOWN = 10
"""The newest retrospective batches on the page (the API pages through all)."""
DISK_SECONDS = 30.0
"""Disk usage is measured at most this often for the page (it walks the small areas, sums the catalog)."""


def _disk(request: Request, ctx: Ctx) -> DiskUsage:
    """The storage's usage, measured again when the app's copy is older than :data:`DISK_SECONDS`."""
    now = time.monotonic()
    cached = getattr(request.app.state, "ui_disk", None)
    if cached is not None and now - cached[0] < DISK_SECONDS:
        return cast(DiskUsage, cached[1])
    usage = disk_usage(ctx.settings, ctx.catalog)
    request.app.state.ui_disk = (now, usage)
    return usage


@router.get("/ops", response_class=HTMLResponse)
def operations(ctx: Ctx, request: Request) -> HTMLResponse:
    now = ctx.clock()
    hours = hourly_stats(ctx.catalog, now, 24)
    starts = [h.start for h in hours]
    charts = [
        line_chart("Turnaround (last instance received -> all results delivered), per hour", starts,
                   [Line("p50", [h.turnaround_p50 for h in hours]), Line("p95", [h.turnaround_p95 for h in hours])],
                   " s"),
        line_chart("Studies delivered per hour", starts, [Line("studies/h", [float(h.studies) for h in hours])]),
        line_chart("Instances received per second (hourly mean)", starts,
                   [Line("instances/s", [h.instances_per_second for h in hours])]),
    ]
    usage = _disk(request, ctx)
    peers = ctx.metrics.peers() if ctx.metrics is not None else []
    refusing = ctx.storage.refusing if ctx.storage is not None else False
    store = BatchStore(ctx.catalog)
    batches = batches_out(store, store.page(BATCHES_SHOWN)[1], now, ctx.settings.queue.offpeak_window)
    workers = worker_facts(ctx.catalog, now, ctx.settings.queue.worker_lost_seconds)
    return page(request, "_ops.html" if is_fragment(request) else "ops.html",
                queues=queue_depths(ctx.catalog, ctx.settings), workers=workers,
                disk=usage, areas=AREAS, storage=ctx.settings.storage,
                peers=peers, charts=charts, now=now, refusing=refusing, batches=batches, title="Operations")


@router.get("/rules", response_class=HTMLResponse)
def rules(ctx: Ctx, request: Request,
          study_id: Annotated[int | None, Query(ge=1, description="a study to test")] = None) -> HTMLResponse:
    """The rule dry run: upload a file or name a study; the page's script posts it to
    ``POST /api/v1/rules/test`` and shows which rules match, which conditions failed and why, and the
    jobs and destinations that would result (nothing is created)."""
    return page(request, "rules.html", study_id=study_id, rules=ctx.settings.rules, title="Rule dry run")
