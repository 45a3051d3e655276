"""The REST API of retrospective batches (:mod:`node.batch`): ``GET /api/v1/batches``, ``GET
/api/v1/batches/{id}`` (studies by state, started, estimated finish from the rate and the window),
``POST /api/v1/batches`` (create) and ``POST /api/v1/batches/{id}/cancel``.

Reads need ``api.read``, the two actions ``api.actions`` (operators). Bodies carry counts, never a
study's UID or patient attributes (queries cannot name a patient: :mod:`node.batch_query`). Errors are problem+json:
``not-found``, ``invalid-batch`` (422: the query, source, model, destinations or rate), ``not-cancellable``.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from node.batch_store import BatchError, BatchProgress, BatchStore, make_spec
from node.dispatch import OffpeakWindow
from node.http.api import NOT_FOUND, PREFIX, Ctx, Limit, Offset, not_found
from node.http.api_models import Page
from node.http.errors import Problem
from node.schema import Batch, BatchState, BatchStudyState

log = logging.getLogger("node.http.api")

router = APIRouter(prefix=PREFIX, tags=["api batches"])
"""Reads (``api.read``)."""
actions_router = APIRouter(prefix=PREFIX, tags=["api batches"])
"""Create and cancel (``api.actions``)."""


class BatchOut(BaseModel):
    model_config = ConfigDict(frozen=True, protected_namespaces=())

    id: int
    query: str = Field(description="the C-FIND keys as validated, e.g. ModalitiesInStudy=CT "
                       "StudyDate=20260101-20260131")
    source: str
    model: str
    destinations: list[str]
    rate_per_hour: float
    anytime: bool = Field(description="retrieves outside queue.offpeak_window too")
    state: BatchState
    note: str | None
    total: int = Field(description="studies the C-FIND found")
    counts: dict[str, int] = Field(description="studies by state (pending, retrieving, retrieved, queued, done, "
                                   "failed, skipped)")
    finished: int = Field(description="studies done, failed or skipped")
    created_at: float
    found_at: float | None = Field(description="when the C-FIND's study list was stored")
    started_at: float | None = Field(description="when the first retrieval started")
    last_retrieval_at: float | None
    estimated_finish_at: float | None = Field(description="when the last study left would start retrieving, "
                                              "at the batch's rate and window (None: none left, or stopped)")
    finished_at: float | None


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    query: str = Field(min_length=1, examples=["Modality=CT StudyDate=20260101-20260131"])
    source: str = Field(description="a dimse destinations entry: queried (C-FIND) and retrieved from")
    model: str
    send_to: list[str] | None = Field(None, description="destinations of the results (default: the source)")
    rate_per_hour: float | None = Field(None, gt=0, description="studies per hour (default batch.rate_per_hour)")
    anytime: bool = Field(False, description="retrieve outside queue.offpeak_window too")


FINISHED = (BatchStudyState.DONE, BatchStudyState.FAILED, BatchStudyState.SKIPPED)


def batch_out(p: BatchProgress) -> BatchOut:
    b = p.batch
    return BatchOut(id=b.id, query=p.query_text, source=b.source, model=b.model, destinations=list(b.destinations),
                    rate_per_hour=b.rate_per_hour, anytime=b.anytime, state=b.state, note=b.note, total=p.total,
                    counts=p.counts, finished=sum(p.counts.get(s, 0) for s in FINISHED), created_at=b.created_at,
                    found_at=b.found_at, started_at=b.started_at, last_retrieval_at=b.last_retrieval_at,
                    estimated_finish_at=p.estimated_finish, finished_at=b.finished_at)


def batches_out(store: BatchStore, batches: list[Batch], now: float, window: str) -> list[BatchOut]:
    """The response bodies of ``batches`` (also ``dicom-node batch ... --json``)."""
    return [batch_out(p) for p in store.progress(batches, now, OffpeakWindow.parse(window))]


def _one(ctx: Ctx, batch_id: int) -> BatchOut:
    store = BatchStore(ctx.catalog)
    b = store.get(batch_id)
    if b is None:
        raise not_found("batch", batch_id)
    return batches_out(store, [b], ctx.clock(), ctx.settings.queue.offpeak_window)[0]


@router.get("/batches", summary="Retrospective batches, newest first, with their progress")
def list_batches(ctx: Ctx, limit: Limit = 50, offset: Offset = 0) -> Page[BatchOut]:
    store = BatchStore(ctx.catalog)
    total, rows = store.page(limit, offset)
    return Page[BatchOut](items=batches_out(store, rows, ctx.clock(), ctx.settings.queue.offpeak_window),
                          total=total, limit=limit, offset=offset)


@router.get("/batches/{batch_id}", summary="One batch: studies by state, started, estimated finish",
            responses=NOT_FOUND)
def get_batch(ctx: Ctx, batch_id: int) -> BatchOut:
    return _one(ctx, batch_id)


@actions_router.post("/batches", status_code=201, summary="Create a batch: C-FIND at the source, retrieve at a "
                     "throttled rate, run one model at priority offpeak, send the results",
                     responses={422: {"description": "problem+json, code invalid-batch"}})
def create_batch(ctx: Ctx, body: BatchCreate) -> BatchOut:
    try:
        spec = make_spec(ctx.settings, query=body.query, source=body.source, model=body.model, send_to=body.send_to,
                         rate_per_hour=body.rate_per_hour, anytime=body.anytime)
    except BatchError as exc:
        raise Problem(422, "invalid-batch", str(exc)) from None
    batch_id = BatchStore(ctx.catalog).create(spec, ctx.clock())
    log.info("batch #%d created (API): %s from %s, keys %s", batch_id, spec.model, spec.source, sorted(spec.query))
    return _one(ctx, batch_id)


@actions_router.post("/batches/{batch_id}/cancel", summary="Stop retrieving a batch's studies (queued jobs run)",
                     responses={**NOT_FOUND, 409: {"description": "problem+json, code not-cancellable"}})
def cancel_batch(ctx: Ctx, batch_id: int) -> BatchOut:
    try:
        b = BatchStore(ctx.catalog).cancel(batch_id, ctx.clock())
    except BatchError as exc:
        raise Problem(409, "not-cancellable", str(exc)) from None
    if b is None:
        raise not_found("batch", batch_id)
    log.info("batch #%d cancelled (API)", batch_id)
    return _one(ctx, batch_id)
