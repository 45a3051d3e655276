"""The remote workers' API (``/api/v1/worker``, permission ``jobs.work``, role ``worker``): a worker host
with neither the catalog nor the spool claims a job, fetches its inputs, returns its results or its
failure, and reports its heartbeat (:mod:`workers.remote` is the client).

Every job route but the claim names the attempt (``attempt`` and ``worker``, as the claim returned
them); an attempt that no longer holds its job (presumed lost, the job queued again or run elsewhere)
gets 409 ``not-holder`` and changes nothing. Results are recorded exactly as the direct path records
them (:func:`node.job_results.record_job_results`); deliveries follow as usual.

With ``remote_workers.deidentify`` the worker sees only de-identified instances and predecessors
(:mod:`node.deid`; images with burned-in annotation are left out of the input list, and a job left
with none ends skipped), and its results are re-identified against the job's sources before they are
stored.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import pydicom
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, Field, ValidationError
from pydicom.dataset import Dataset
from pydicom.uid import EncapsulatedPDFStorage
from starlette.concurrency import run_in_threadpool

from models.errors import InputError
from node.catalog_ops import JobTimings
from node.deid import (
    LEFT_OUT_OBJECTS,
    BurnedInAnnotation,
    Pseudonymizer,
    deidentify,
    ensure_key,
    refuse_burned_in,
    reidentify,
)
from node.http.api import PREFIX, Ctx
from node.http.context import NodeContext
from node.http.errors import Problem
from node.job_results import Outcome, ResultObject, end_attempt, record_job_results
from node.policy import Holder, holds, job_policy
from node.receive.stow import MultipartError, parse_media_type, parse_multipart, valid_boundary
from node.route import is_pair_model
from node.schema import BINARY_VARIANT, Instance, Job, JobState
from node.worker_beats import Beat, remove_beat, write_beat

log = logging.getLogger("node.http.api_worker")

router = APIRouter(prefix=PREFIX + "/worker", tags=["remote workers"])

DICOM = "application/dicom"
MB = 1 << 20
_NOT_HOLDER: dict[int | str, dict[str, Any]] = {
    409: {"description": "problem+json, code not-holder: this attempt no longer holds the job"}}


class HeartbeatIn(BaseModel):
    host: str = Field(min_length=1, max_length=128)
    pid: int = Field(ge=0)
    queues: str = Field("", max_length=256)
    started_at: float
    job_id: int | None = None
    gpu: str | None = Field(None, max_length=128)


class StoppedIn(BaseModel):
    host: str = Field(min_length=1, max_length=128)
    pid: int = Field(ge=0)


class ClaimIn(BaseModel):
    worker: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,100}:\d{1,10}$")
    """``host:pid`` of the worker process (recorded on the job; its heartbeat row has the same)."""


class ClaimOut(BaseModel):
    job_id: int
    study_id: int
    model: str
    attempt: int
    worker: str
    inputs: list[str]
    """Opaque ids of the series' instances (``GET .../inputs/{id}``)."""
    prior: list[str] | None
    """Opaque ids of the prior series' instances; None without a prior."""
    predecessors: dict[str, str]
    """Variant (``""``, ``binary``) -> opaque id of the SR an earlier run wrote (``GET .../predecessors/{id}``)."""
    leave_out: list[str] = Field(default_factory=list)
    """Manifest objects (``PDF``) the worker must not make: with de-identified inputs their rendered
    text could not be re-identified (:data:`node.deid.LEFT_OUT_OBJECTS`); the node refuses them."""


class FailureIn(BaseModel):
    attempt: int
    worker: str
    outcome: Literal["skip", "fail", "retry"]
    reason: str = Field(max_length=4000)


class ResultsSummary(BaseModel):
    """The JSON part of a results POST."""

    attempt: int
    worker: str
    state: Literal["done", "skipped"] = "done"
    reason: str | None = Field(None, max_length=4000)
    variants: list[str] = Field(default_factory=list)
    """Per DICOM part, in order: its variant (``""``, ``binary``, ``labelmap``)."""
    timings: dict[str, Any] | None = None
    """load_seconds, infer_seconds, encode_seconds, model_version (:class:`node.catalog_ops.JobTimings`)."""


class StateOut(BaseModel):
    job_id: int
    state: JobState


def _not_holder(job_id: int) -> Problem:
    return Problem(409, "not-holder", f"job {job_id}: this attempt no longer holds the job")


def _held(ctx: NodeContext, job_id: int, holder: Holder) -> Job:
    job = ctx.catalog.get_job(job_id)
    if job is None or not holds(job, holder):
        raise _not_holder(job_id)
    return job


def _pseudonymizer(ctx: NodeContext) -> Pseudonymizer:
    rw = ctx.settings.remote_workers
    return Pseudonymizer(ensure_key(rw.key_file or ctx.settings.node.storage_dir / "deid.key"))


def _job_instances(ctx: NodeContext, job: Job) -> tuple[list[Instance], list[Instance] | None]:
    """The instances of the job's series, and of its prior series (registration models; None without one)."""
    prior = ctx.catalog.prior_series(job) if is_pair_model(job.model) else None
    return (ctx.catalog.instances_of_series(job.series_id),
            None if prior is None else ctx.catalog.instances_of_series(prior.id))


def _servable(ctx: NodeContext, instances: list[Instance]) -> list[Instance]:
    """With de-identification: the instances that may leave (no burned-in annotation)."""
    if not ctx.settings.remote_workers.deidentify:
        return instances
    out = []
    for i in instances:
        try:
            refuse_burned_in(pydicom.dcmread(ctx.spool.path(i.path), stop_before_pixels=True))
        except BurnedInAnnotation:
            continue
        out.append(i)
    return out


@router.post("/heartbeat", status_code=204, summary="A remote worker process is alive (its workers row)")
def heartbeat(ctx: Ctx, body: HeartbeatIn) -> Response:
    write_beat(ctx.catalog, Beat(body.host, body.pid, body.queues, body.started_at, body.job_id, body.gpu),
               ctx.clock())
    return Response(status_code=204)


@router.post("/heartbeat/stopped", status_code=204, summary="A remote worker process stopped cleanly")
def heartbeat_stopped(ctx: Ctx, body: StoppedIn) -> Response:
    remove_beat(ctx.catalog, body.host, body.pid)
    return Response(status_code=204)


@router.post("/jobs/{job_id}/claim", summary="Claim a job (queued, or lost by its worker)",
             responses={409: {"description": "problem+json, code not-claimed or skipped"}})
def claim(ctx: Ctx, job_id: int, body: ClaimIn) -> ClaimOut:
    policy = job_policy(ctx.settings)
    job = ctx.catalog.claim_job(job_id, ctx.clock(), worker=body.worker, policy=policy)
    if job is None:
        raise Problem(409, "not-claimed", f"job {job_id} is finished, failed, or running elsewhere")
    holder = Holder(job.attempts, body.worker)
    series, prior = _job_instances(ctx, job)
    inputs = _servable(ctx, series)
    if not inputs:
        reason = "every image of the series may carry burned-in annotation: not sent to a remote worker"
        end_attempt(ctx.catalog, job.id, "skip", reason, policy, ctx.clock(), holder=holder)
        log.info("job #%d skipped: no image of its series may leave the node (de-identification)", job.id)
        raise Problem(409, "skipped", reason)
    prior = None if prior is None else _servable(ctx, prior)
    predecessors = {}
    for variant in ("", BINARY_VARIANT):
        previous = ctx.catalog.previous_result(job, "SR", variant)
        if previous is not None:
            predecessors[variant] = str(previous.id)
    log.info("job #%d attempt %d claimed by remote worker %s", job.id, job.attempts, body.worker)
    return ClaimOut(job_id=job.id, study_id=job.study_id, model=job.model, attempt=job.attempts, worker=body.worker,
                    inputs=[str(i.id) for i in inputs], prior=None if not prior else [str(i.id) for i in prior],
                    predecessors=predecessors,
                    leave_out=sorted(LEFT_OUT_OBJECTS) if ctx.settings.remote_workers.deidentify else [])


def _dicom_response(ctx: NodeContext, path: Path) -> Response:
    if not ctx.settings.remote_workers.deidentify:
        return FileResponse(path, media_type=DICOM)
    try:
        out = deidentify(pydicom.dcmread(path), _pseudonymizer(ctx))
    except BurnedInAnnotation:
        raise Problem(404, "not-found", "the instance may carry burned-in annotation: it does not leave the node") \
            from None
    buf = io.BytesIO()
    out.save_as(buf, enforce_file_format=True)
    return Response(buf.getvalue(), media_type=DICOM)


@router.get("/jobs/{job_id}/inputs/{object_id}", response_class=Response, responses=_NOT_HOLDER,
            summary="One instance of the job's series or prior (application/dicom)")
def job_input(ctx: Ctx, job_id: int, object_id: int, attempt: Annotated[int, Query()],
              worker: Annotated[str, Query()]) -> Response:
    job = _held(ctx, job_id, Holder(attempt, worker))
    with ctx.catalog.reading() as s:
        found = s.get(Instance, object_id)
        if found is not None:
            s.expunge(found)
    prior = ctx.catalog.prior_series(job) if is_pair_model(job.model) else None
    if found is None or found.series_id not in (job.series_id, None if prior is None else prior.id):
        raise Problem(404, "not-found", f"job {job_id} has no input {object_id}")
    return _dicom_response(ctx, ctx.spool.path(found.path))


@router.get("/jobs/{job_id}/predecessors/{object_id}", response_class=Response, responses=_NOT_HOLDER,
            summary="An SR an earlier run of the job wrote (application/dicom)")
def job_predecessor(ctx: Ctx, job_id: int, object_id: int, attempt: Annotated[int, Query()],
                    worker: Annotated[str, Query()]) -> Response:
    job = _held(ctx, job_id, Holder(attempt, worker))
    for variant in ("", BINARY_VARIANT):
        previous = ctx.catalog.previous_result(job, "SR", variant)
        if previous is not None and previous.id == object_id:
            return _dicom_response(ctx, ctx.spool.path(previous.path))
    raise Problem(404, "not-found", f"job {job_id} has no predecessor {object_id}")


@router.post("/jobs/{job_id}/failure", summary="End a failed attempt (skip, fail, retry)", responses=_NOT_HOLDER)
def job_failure(ctx: Ctx, job_id: int, body: FailureIn) -> StateOut:
    outcome: Outcome = body.outcome
    state = end_attempt(ctx.catalog, job_id, outcome, body.reason, job_policy(ctx.settings), ctx.clock(),
                        holder=Holder(body.attempt, body.worker))
    if state is None:
        raise _not_holder(job_id)
    log.info("job #%d attempt %d (remote worker %s) ended: %s", job_id, body.attempt, body.worker, state)
    return StateOut(job_id=job_id, state=state)


@router.post("/jobs/{job_id}/results", summary="Return a job's results (multipart/related)",
             responses={**_NOT_HOLDER, 400: {"description": "problem+json: malformed body or result objects"},
                        413: {"description": "over http.max_request_mb"}},
             openapi_extra={"requestBody": {"required": True, "content": {
                 'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}}}})
async def job_results(ctx: Ctx, job_id: int, request: Request) -> StateOut:
    """A JSON part (:class:`ResultsSummary`: the attempt, state, reason, variants, timings), then one
    ``application/dicom`` part per result object."""
    media, params = parse_media_type(request.headers.get("content-type", ""))
    boundary = params.get("boundary", "")
    if media != "multipart/related" or not valid_boundary(boundary):
        raise Problem(415, "unsupported-media-type", 'expected multipart/related; type="application/dicom"')
    limit = ctx.settings.http.max_request_mb * MB
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise Problem(413, "too-large", f"request over http.max_request_mb ({ctx.settings.http.max_request_mb} MB)")
    body = await request.body()
    if len(body) > limit:
        raise Problem(413, "too-large", f"request over http.max_request_mb ({ctx.settings.http.max_request_mb} MB)")
    return await run_in_threadpool(_record, ctx, job_id, body, boundary)


def _record(ctx: NodeContext, job_id: int, body: bytes, boundary: str) -> StateOut:
    try:
        parts = parse_multipart(body, boundary)
        summary = ResultsSummary.model_validate_json(parts[0].content if parts else b"")
    except (MultipartError, ValidationError) as exc:
        raise Problem(400, "bad-request", f"not a results body: {type(exc).__name__}") from None
    dicom = [p.content for p in parts[1:]]
    if len(summary.variants) != len(dicom):
        raise Problem(400, "bad-request", "variants must name one variant per DICOM part")
    holder = Holder(summary.attempt, summary.worker)
    job = _held(ctx, job_id, holder)
    state = JobState.DONE if summary.state == "done" else JobState.SKIPPED
    try:
        objects = _objects(ctx, job, dicom, summary.variants)
        timings = None if summary.timings is None else JobTimings(**summary.timings)
    except (InputError, ValueError, TypeError) as exc:
        raise Problem(400, "bad-result", f"result objects refused: {type(exc).__name__}") from None
    try:
        written = record_job_results(ctx.catalog, ctx.spool, job, objects, ctx.clock, state=state,
                                     reason=summary.reason, timings=timings, holder=holder)
    except InputError as exc:
        raise Problem(400, "bad-result", str(exc)) from None
    if written is None:
        raise _not_holder(job_id)
    log.info("job #%d attempt %d (remote worker %s): %d result object(s) recorded, %s", job_id, summary.attempt,
             summary.worker, len(written), state)
    return StateOut(job_id=job_id, state=state)


def _objects(ctx: NodeContext, job: Job, dicom: list[bytes], variants: list[str]) -> list[ResultObject]:
    """The returned objects as the node stores them: re-identified when the worker saw de-identified inputs."""
    if not ctx.settings.remote_workers.deidentify:
        return [ResultObject(data, variant) for data, variant in zip(dicom, variants, strict=True)]
    p = _pseudonymizer(ctx)
    series, prior = _job_instances(ctx, job)
    sources: list[Dataset] = [pydicom.dcmread(ctx.spool.path(i.path), stop_before_pixels=True)
                              for i in [*series, *(prior or [])]]
    for variant in ("", BINARY_VARIANT):
        previous = ctx.catalog.previous_result(job, "SR", variant)
        if previous is not None:
            sources.append(pydicom.dcmread(ctx.spool.path(previous.path), stop_before_pixels=True))
    out = []
    for data, variant in zip(dicom, variants, strict=True):
        ds: Dataset = pydicom.dcmread(io.BytesIO(data))
        if "PDF" in LEFT_OUT_OBJECTS and ds.get("SOPClassUID") == EncapsulatedPDFStorage:
            raise ValueError("an Encapsulated PDF made from de-identified inputs")
        ds = reidentify(ds, sources, p)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(ResultObject(buf.getvalue(), variant, ds))
    return out
