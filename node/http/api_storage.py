"""The REST API of the storage lifecycle: ``GET /api/v1/storage`` (usage by area, what a purge would
remove now and why; ``api-read``) and ``POST /api/v1/storage/purge?dry_run=true|false`` (``admin``).

A real purge runs in the node (its receiver holds new instances of a study back while the study is
purged, :mod:`node.lifecycle`); an app without the node's storage keeper answers 503 ``unavailable``.
Nothing here carries patient data: studies are named by catalog id and Study Instance UID.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from node.http.api import PREFIX, Ctx
from node.http.errors import Problem
from node.lifecycle.purge import PurgeOutcome, PurgePlan, plan_purge
from node.lifecycle.usage import disk_usage

router = APIRouter(prefix=PREFIX, tags=["storage"])
"""Reads (``api-read``)."""
admin_router = APIRouter(prefix=PREFIX, tags=["storage"])
"""The purge (``admin``)."""


class UsageOut(BaseModel):
    total: int
    used: int
    free: int
    used_percent: float
    areas: dict[str, int]
    """Bytes by area: instances, results, queue, catalog, audit, tmp."""


class PurgeItemOut(BaseModel):
    study_id: int
    study_uid: str
    scope: str
    """``instances`` (received instances only; the study stays, marked purged) or ``study`` (everything)."""
    reason: str
    """The retention key that made it due (``instances_days``...) or ``watermark``."""
    settled_at: float
    files: int
    bytes: int
    rows: int


class PlanOut(BaseModel):
    usage: UsageOut | None
    high_watermark_percent: float
    low_watermark_percent: float
    refusing: bool
    """Above the high watermark with nothing to purge: new instances are refused."""
    studies: int
    files: int
    bytes: int
    rows: int
    target_bytes: int
    """Bytes the watermarks need freed (0: below the high watermark)."""
    kept: dict[str, int]
    """Studies kept, by why."""
    items: list[PurgeItemOut]
    """The first ``limit`` studies of the plan, oldest settled first."""


class PurgeOut(PlanOut):
    dry_run: bool
    purged: int | None = None
    """Studies purged (None: dry run)."""
    purged_files: int | None = None
    purged_bytes: int | None = None
    purged_rows: int | None = None
    skipped: dict[str, str] | None = None
    """Studies of the plan no longer eligible when their turn came, by id, with why."""


def _plan_out(ctx: Ctx, plan: PurgePlan, limit: int) -> PlanOut:
    st = ctx.settings.storage
    d = plan.to_dict()
    return PlanOut(usage=UsageOut(**d["usage"]) if d["usage"] else None,
                   high_watermark_percent=st.high_watermark_percent, low_watermark_percent=st.low_watermark_percent,
                   refusing=ctx.storage.refusing if ctx.storage else False, studies=d["studies"], files=d["files"],
                   bytes=d["bytes"], rows=d["rows"], target_bytes=d["target_bytes"], kept=d["kept"],
                   items=[PurgeItemOut(**i) for i in d["items"][:limit]])


Limit = Annotated[int, Query(ge=0, le=10000, description="studies of the plan listed")]


@router.get("/storage", summary="Disk usage by area, and what a purge would remove now")
def storage(ctx: Ctx, limit: Limit = 100) -> PlanOut:
    if ctx.storage is not None:
        plan = ctx.storage.plan()
    else:
        plan = plan_purge(ctx.settings, ctx.catalog, ctx.clock(), usage=disk_usage(ctx.settings, ctx.catalog))
    return _plan_out(ctx, plan, limit)


@admin_router.post("/storage/purge", summary="Purge what retention and the watermarks allow now (or show it)",
                   responses={503: {"description": "problem+json, code unavailable: the node's lifecycle is not "
                                                   "running in this process"}})
def purge(ctx: Ctx, dry_run: Annotated[bool, Query(description="only show the plan")] = True,
          limit: Limit = 100) -> PurgeOut:
    """Dry run by default: ``dry_run=false`` purges. Studies go whole or their instances only
    (``scope``); each is checked again as it goes, and nothing not yet delivered is ever removed."""
    outcome: PurgeOutcome | None = None
    if ctx.storage is not None:
        plan, outcome = ctx.storage.purge(dry_run=dry_run)
    elif dry_run:
        plan = plan_purge(ctx.settings, ctx.catalog, ctx.clock(), usage=disk_usage(ctx.settings, ctx.catalog))
    else:
        raise Problem(503, "unavailable", "the storage lifecycle runs in the node process only")
    out = PurgeOut(**_plan_out(ctx, plan, limit).model_dump(), dry_run=outcome is None)
    if outcome is not None:
        out.purged, out.purged_files, out.purged_bytes, out.purged_rows = (
            len(outcome.purged), outcome.files, outcome.bytes, outcome.rows)
        out.skipped = {str(k): v for k, v in outcome.skipped.items()}
    return out
