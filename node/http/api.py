"""The REST API, read side (``GET /api/v1/...``): studies, jobs, deliveries, destinations, models.

Lists are paged (``limit``, ``offset``; newest first) and filtered by state (and model,
destination). No route here returns patient attributes, except ``GET /api/v1/studies/{id}/dicom``,
which must be asked for by name. Errors are problem+json (:mod:`node.http.errors`) with a stable
``code``: ``not-found``, ``invalid-parameters``. The actions (retry, rerun, pause) are in
:mod:`node.http.api_actions`.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import pydicom
from fastapi import APIRouter, Depends, Query, Response

from models import registry
from node.config import DicomwebDestination, DimseDestination
from node.dicomweb.attributes import STUDY_KEYWORDS, to_dicom_json
from node.http.api_models import (
    DeliveryOut,
    DestinationOut,
    JobOut,
    JobTimes,
    ModelOut,
    Page,
    ResultOut,
    SeriesOut,
    StudyCounts,
    StudyDetail,
    StudyDicom,
    StudySummary,
    StudyTimes,
)
from node.http.context import NodeContext, node_context
from node.http.errors import Problem
from node.overview import (
    DeliveryFacts,
    StudyFacts,
    delivery_counts,
    delivery_page,
    first_instance_path,
    job_page,
    series_attributes,
    study_detail,
    study_page,
)
from node.schema import DeliveryState, Job, JobState, Result, StudyState

PREFIX = "/api/v1"
router = APIRouter(prefix=PREFIX, tags=["api"])

Ctx = Annotated[NodeContext, Depends(node_context)]
Limit = Annotated[int, Query(ge=1, le=500, description="page size")]
Offset = Annotated[int, Query(ge=0, description="rows to skip")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no such row (problem+json, code not-found)"}}

STUDY_INSTANCE_UID_TAG = "0020000D"


def not_found(what: str, row_id: int | str) -> Problem:
    return Problem(404, "not-found", f"no {what} {row_id}")


# ---- conversions (catalog rows -> response bodies) ----------------------------------------------
def study_summary(f: StudyFacts) -> StudySummary:
    st = f.study
    return StudySummary(
        id=st.id, study_uid=st.study_uid, state=st.state, generation=st.generation, note=st.note,
        counts=StudyCounts(series=f.series, instances=st.instance_count, results=f.results, jobs=f.jobs,
                           deliveries=f.deliveries),
        times=StudyTimes(first_received_at=st.first_received_at, last_received_at=st.last_received_at,
                         ready_at=st.ready_at, routed_at=st.routed_at, first_enqueued_at=f.first_enqueued_at,
                         jobs_started_at=f.jobs_started_at, jobs_finished_at=f.jobs_finished_at,
                         delivered_at=f.delivered_at),
    )


def job_out(j: Job) -> JobOut:
    return JobOut(
        id=j.id, study_id=j.study_id, series_id=j.series_id, generation=j.generation, model=j.model,
        model_version=j.model_version, rule=j.rule, destinations=list(j.destinations), state=j.state,
        attempts=j.attempts, worker=j.worker, error=j.error,
        times=JobTimes(created_at=j.created_at, first_enqueued_at=j.first_enqueued_at, enqueued_at=j.enqueued_at,
                       not_before=j.not_before, started_at=j.started_at, finished_at=j.finished_at,
                       updated_at=j.updated_at, load_seconds=j.load_seconds, infer_seconds=j.infer_seconds,
                       encode_seconds=j.encode_seconds),
    )


def result_out(r: Result) -> ResultOut:
    return ResultOut(id=r.id, job_id=r.job_id, kind=r.kind, sop_instance_uid=r.sop_instance_uid,
                     sop_class_uid=r.sop_class_uid, variant=r.variant)


def delivery_out(f: DeliveryFacts, paused: set[str]) -> DeliveryOut:
    d = f.delivery
    return DeliveryOut(
        id=d.id, result_id=d.result_id, job_id=f.job_id, study_id=f.study_id, kind=f.kind,
        sop_instance_uid=f.sop_instance_uid, destination=d.destination, destination_paused=d.destination in paused,
        state=d.state, attempts=d.attempts, last_error=d.last_error, next_attempt_at=d.next_attempt_at,
        first_attempt_at=d.first_attempt_at, sent_at=d.sent_at,
    )


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def destination_out(d: DimseDestination | DicomwebDestination, paused: bool, counts: dict[str, int]) -> DestinationOut:
    """A destination's configuration without secrets (no password or token, nor their files)."""
    if isinstance(d, DimseDestination):
        return DestinationOut(name=d.name, type="dimse", ae_title=d.ae_title, host=d.host, port=d.port,
                              calling_ae_title=d.calling_ae_title, paused=paused, deliveries=counts)
    auth = "basic" if d.username is not None else "bearer" if d.token_file is not None else None
    return DestinationOut(name=d.name, type="dicomweb", url=_without_userinfo(d.url), auth=auth,
                          accepts_labelmap=d.accepts_labelmap, max_request_mb=d.max_request_mb, paused=paused,
                          deliveries=counts)


def destination_of(ctx: NodeContext, name: str) -> DestinationOut:
    try:
        d = ctx.settings.destination(name)
    except KeyError:
        raise not_found("destination", name) from None
    counts = delivery_counts(ctx.catalog).get(name, {})
    return destination_out(d, name in ctx.catalog.paused_destinations(), counts)


def job_of(ctx: NodeContext, job_id: int) -> JobOut:
    job = ctx.catalog.get_job(job_id)
    if job is None:
        raise not_found("job", job_id)
    return job_out(job)


def delivery_of(ctx: NodeContext, delivery_id: int) -> DeliveryOut:
    _, rows = delivery_page(ctx.catalog, delivery_id=delivery_id, limit=1, offset=0)
    if not rows:
        raise not_found("delivery", delivery_id)
    return delivery_out(rows[0], ctx.catalog.paused_destinations())


# ---- routes -----------------------------------------------------------------------------------
@router.get("/studies", summary="Studies, newest first (no patient attributes)")
def list_studies(ctx: Ctx, state: StudyState | None = None, limit: Limit = 50,
                 offset: Offset = 0) -> Page[StudySummary]:
    total, rows = study_page(ctx.catalog, state=state, limit=limit, offset=offset)
    return Page[StudySummary](items=[study_summary(f) for f in rows], total=total, limit=limit, offset=offset)


@router.get("/studies/{study_id}", summary="A study: series (routing attributes), jobs, results, deliveries",
            responses=NOT_FOUND)
def get_study(ctx: Ctx, study_id: int) -> StudyDetail:
    detail = study_detail(ctx.catalog, study_id)
    if detail is None:
        raise not_found("study", study_id)
    paused = ctx.catalog.paused_destinations()
    return StudyDetail(
        **study_summary(detail.facts).model_dump(),
        series=[SeriesOut(id=s.id, series_uid=s.series_uid, instance_count=s.instance_count,
                          attributes=series_attributes(s)) for s in detail.series],
        jobs=[job_out(j) for j in detail.jobs],
        results=[result_out(r) for r in detail.results],
        deliveries=[delivery_out(d, paused) for d in detail.deliveries],
    )


@router.get("/studies/{study_id}/dicom", responses=NOT_FOUND,
            summary="The study's patient and study attributes (PHI: the only route that returns them)")
def get_study_dicom(ctx: Ctx, study_id: int, response: Response) -> StudyDicom:
    """The study-level attributes the catalog keeps (QIDO-RS's), or, for a study recorded before it
    kept them, those of its first spooled instance. Answered with ``Cache-Control: no-store``."""
    study = ctx.catalog.get_study(study_id)
    if study is None:
        raise not_found("study", study_id)
    response.headers["Cache-Control"] = "no-store"
    uid = {STUDY_INSTANCE_UID_TAG: {"vr": "UI", "Value": [study.study_uid]}}
    if study.dicom is not None:
        return StudyDicom(study_id=study_id, source="catalog", attributes={**study.dicom, **uid})
    rel = first_instance_path(ctx.catalog, study_id)
    if rel is None:
        raise Problem(404, "not-found", f"study {study_id} has no stored instance")
    try:
        ds = pydicom.dcmread(ctx.spool.path(rel), stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError):
        raise Problem(404, "not-found", f"the stored instance of study {study_id} cannot be read") from None
    return StudyDicom(study_id=study_id, source="instance", attributes={**to_dicom_json(ds, STUDY_KEYWORDS), **uid})


@router.get("/jobs", summary="Jobs, newest first")
def list_jobs(ctx: Ctx, state: JobState | None = None, model: str | None = None,
              study: Annotated[int | None, Query(description="catalog id of a study")] = None,
              limit: Limit = 50, offset: Offset = 0) -> Page[JobOut]:
    total, rows = job_page(ctx.catalog, state=state, model=model, study_id=study, limit=limit, offset=offset)
    return Page[JobOut](items=[job_out(j) for j in rows], total=total, limit=limit, offset=offset)


@router.get("/jobs/{job_id}", summary="A job: state, attempts, worker, error, model version, timings",
            responses=NOT_FOUND)
def get_job(ctx: Ctx, job_id: int) -> JobOut:
    return job_of(ctx, job_id)


@router.get("/deliveries", summary="Deliveries of results to destinations, newest first")
def list_deliveries(ctx: Ctx, state: DeliveryState | None = None, destination: str | None = None,
                    limit: Limit = 50, offset: Offset = 0) -> Page[DeliveryOut]:
    total, rows = delivery_page(ctx.catalog, state=state, destination=destination, limit=limit, offset=offset)
    paused = ctx.catalog.paused_destinations()
    return Page[DeliveryOut](items=[delivery_out(f, paused) for f in rows], total=total, limit=limit, offset=offset)


@router.get("/deliveries/{delivery_id}", summary="A delivery", responses=NOT_FOUND)
def get_delivery(ctx: Ctx, delivery_id: int) -> DeliveryOut:
    return delivery_of(ctx, delivery_id)


@router.get("/destinations", summary="Configured destinations (no secrets), paused flag, deliveries by state")
def list_destinations(ctx: Ctx) -> list[DestinationOut]:
    paused = ctx.catalog.paused_destinations()
    counts = delivery_counts(ctx.catalog)
    return [destination_out(d, d.name in paused, counts.get(d.name, {})) for d in ctx.settings.destinations]


@router.get("/models", summary="Models this node knows (from their manifests; nothing is loaded)")
def list_models(ctx: Ctx) -> list[ModelOut]:
    out = []
    for name in registry.available():
        spec, m = registry.spec(name), registry.manifest(name)
        out.append(ModelOut(
            name=m.name, version=m.version, family=m.family, description=m.description,
            modalities=list(m.modalities), min_slices=m.min_slices, runtime=spec.runtime, extra=spec.extra,
            missing_modules=registry.missing_modules(name), queue=ctx.settings.model_settings(name).queue,
            rules=[r.name for r in ctx.settings.rules if name in r.models],
        ))
    return out
