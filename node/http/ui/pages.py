"""Dashboard pages about studies: the list with filters and per-stage timelines (``/``), one study
(``/studies/{study_id}``) and the failures with their actions (``/failures``). Each page's live part
is also served alone (``?fragment=1``) for the page's refresh script."""

from __future__ import annotations

import datetime as dt
import math
import time
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from models import registry
from node.http.api import Ctx, not_found
from node.http.ui.render import is_fragment, page
from node.http.ui.timeline import destination_stages, stages
from node.overview import job_page, study_detail, study_page
from node.overview_ops import destination_states, failing_deliveries, result_series_uids
from node.schema import JobState, StudyState

router = APIRouter(include_in_schema=False)

PAGE_SIZE = 50
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
"""SOP Class UID root of the Secondary Capture Image Storage classes: the key images, shown as
thumbnails (WADO-RS ``/rendered``)."""


def _local_midnight(day: dt.date) -> float:
    return time.mktime(day.timetuple())


def model_names(ctx: Ctx) -> list[str]:
    """Models a filter may name: those the rules name and those installed."""
    named = {m for r in ctx.settings.rules for m in r.models}
    return sorted(named | set(registry.available()))


@router.get("/", response_class=HTMLResponse)
def studies(ctx: Ctx, request: Request, state: StudyState | None = None,
            model: Annotated[str | None, Query(max_length=128)] = None,
            destination: Annotated[str | None, Query(max_length=64)] = None,
            since: dt.date | None = None, until: dt.date | None = None,
            page_no: Annotated[int, Query(alias="page", ge=1)] = 1) -> HTMLResponse:
    """Studies, newest first, with their timelines; filters by state, model, destination and the day
    their first instance arrived (``since`` to ``until``, both included, the node's local time)."""
    total, rows = study_page(
        ctx.catalog, state=state, model=model or None, destination=destination or None,
        since=_local_midnight(since) if since else None,
        until=_local_midnight(until + dt.timedelta(days=1)) if until else None,
        limit=PAGE_SIZE, offset=(page_no - 1) * PAGE_SIZE)
    paused = ctx.catalog.paused_destinations()
    per_dest = destination_states(ctx.catalog, [f.study.id for f in rows])
    items = [(f, stages(f), destination_stages(per_dest.get(f.study.id, {}), paused)) for f in rows]
    filters = {"state": state.value if state else "", "model": model or "", "destination": destination or "",
               "since": since.isoformat() if since else "", "until": until.isoformat() if until else ""}
    query = urlencode({k: v for k, v in filters.items() if v})
    return page(request, "_studies.html" if is_fragment(request) else "studies.html",
                items=items, total=total, page_no=page_no, pages=max(1, math.ceil(total / PAGE_SIZE)),
                filters=filters, query=query, states=[s.value for s in StudyState], models=model_names(ctx),
                destinations=[d.name for d in ctx.settings.destinations], title="Studies")


@router.get("/studies/{study_id}", response_class=HTMLResponse)
def study(ctx: Ctx, request: Request, study_id: int) -> HTMLResponse:
    """One study: timeline, series, jobs (attempts, worker, error, durations), results (key images as
    thumbnails) and deliveries, with the actions that apply."""
    detail = study_detail(ctx.catalog, study_id)
    if detail is None:
        raise not_found("study", study_id)
    paused = ctx.catalog.paused_destinations()
    per_dest = destination_states(ctx.catalog, [study_id]).get(study_id, {})
    series_of = result_series_uids(ctx.catalog, [r.sop_instance_uid for r in detail.results
                                                 if r.sop_class_uid.startswith(SECONDARY_CAPTURE)])
    thumbnails = {sop: f"/dicom-web/studies/{detail.facts.study.study_uid}/series/{series}/instances/{sop}"
                       "/rendered?viewport=160,160" for sop, series in series_of.items()}
    return page(request, "_study.html" if is_fragment(request) else "study.html", d=detail,
                timeline=stages(detail.facts), dests=destination_stages(per_dest, paused), paused=paused,
                thumbnails=thumbnails, rerunnable=detail.facts.study.state in (StudyState.ROUTED, StudyState.UNROUTED),
                title=f"Study #{study_id}")


@router.get("/failures", response_class=HTMLResponse)
def failures(ctx: Ctx, request: Request) -> HTMLResponse:
    """Jobs failed for good, deliveries whose last attempt failed, and the destinations (pause/resume)."""
    jobs_total, jobs = job_page(ctx.catalog, state=JobState.FAILED, model=None, limit=200, offset=0)
    deliveries_total, deliveries = failing_deliveries(ctx.catalog, limit=200, offset=0)
    paused = ctx.catalog.paused_destinations()
    failing_by_dest: dict[str, int] = {}
    for f in deliveries:
        failing_by_dest[f.delivery.destination] = failing_by_dest.get(f.delivery.destination, 0) + 1
    destinations = [(d.name, d.type, d.name in paused, failing_by_dest.get(d.name, 0))
                    for d in ctx.settings.destinations]
    return page(request, "_failures.html" if is_fragment(request) else "failures.html", jobs=jobs,
                jobs_total=jobs_total, deliveries=deliveries, deliveries_total=deliveries_total,
                destinations=destinations, now=ctx.clock(), title="Failures")
