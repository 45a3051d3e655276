"""The REST API, actions (``POST /api/v1/...``): retry a job or a delivery, rerun a study, pause and
resume a destination. Each changes the catalog only; the node's loops act on it (the enqueuer sends
queued jobs, the deliverer sends due deliveries and holds those to a paused destination).

Errors are problem+json with a stable ``code``: ``not-found``, ``not-retryable`` (the row is not in
a state the action applies to), ``unknown-model``, ``not-routed`` (the study is still being
received or routed), ``nothing-to-rerun``, ``purged`` (the study's instances were purged by the
storage lifecycle: nothing to run on).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body

from models import registry
from node.catalog import JobSpec
from node.catalog_ops import RERUNNABLE
from node.http.api import (
    NOT_FOUND,
    PREFIX,
    Ctx,
    delivery_of,
    destination_of,
    job_of,
    not_found,
)
from node.http.api_models import DeliveryOut, DestinationOut, JobOut, RerunOut, RerunRequest
from node.http.errors import Problem
from node.lifecycle.purge import instances_purged
from node.schema import DeliveryState, JobState, StudyState

log = logging.getLogger("node.http.api")

router = APIRouter(prefix=PREFIX, tags=["api actions"])

RERUN_RULE = "api-rerun"
"""The ``rule`` of a job a rerun creates for a model the study had no job of."""


def _conflict(code: str, detail: str) -> dict[int | str, dict[str, Any]]:
    return {409: {"description": f"problem+json, code {code}: {detail}"}}


def _purged(study_id: int) -> Problem:
    return Problem(409, "purged", f"study {study_id}: its instances were purged (storage.retention); "
                   "send the study again to run it")


@router.post("/jobs/{job_id}/retry", status_code=202, summary="Queue a failed or skipped job again (fresh attempts)",
             responses={**NOT_FOUND, **_conflict("not-retryable | purged", "the job is not failed or skipped, "
                                                  "or its study's instances were purged")})
def retry_job(ctx: Ctx, job_id: int) -> JobOut:
    job = ctx.catalog.get_job(job_id)
    if job is None:
        raise not_found("job", job_id)
    if instances_purged(ctx.catalog, job.study_id):
        raise _purged(job.study_id)
    if job.state not in (JobState.FAILED, JobState.SKIPPED) or not ctx.catalog.retry_jobs(job_ids=[job_id]):
        raise Problem(409, "not-retryable", f"job {job_id} is {job.state}; only failed or skipped jobs are retried")
    log.info("job #%d queued again (API)", job_id)
    return job_of(ctx, job_id)


@router.post("/deliveries/{delivery_id}/retry", summary="Make a pending delivery due now",
             responses={**NOT_FOUND, **_conflict("not-retryable", "the delivery is not pending")})
def retry_delivery(ctx: Ctx, delivery_id: int) -> DeliveryOut:
    current = delivery_of(ctx, delivery_id)
    if current.state != DeliveryState.PENDING or not ctx.catalog.retry_delivery(delivery_id, ctx.clock()):
        raise Problem(409, "not-retryable", f"delivery {delivery_id} is {current.state}; only pending deliveries "
                      "are retried (rerun the study to send its results again)")
    log.info("delivery #%d due now (API)", delivery_id)
    return delivery_of(ctx, delivery_id)


@router.post("/studies/{study_id}/rerun", status_code=202,
             summary="Run the study's current generation again (its done, skipped and failed jobs; or one model)",
             responses={404: {"description": "problem+json, code not-found or unknown-model"},
                        **_conflict("not-routed | nothing-to-rerun | purged",
                                  "still receiving, every job is under way, or its instances were purged")})
def rerun_study(ctx: Ctx, study_id: int, body: Annotated[RerunRequest | None, Body()] = None) -> RerunOut:
    """With ``{"model": name}`` only that model's jobs run again, and series of a matching modality
    that had no job of it get one (sent where the rules naming the model, and the study's jobs, send).
    Results keep their UIDs and replace the earlier ones in the destinations."""
    model = body.model if body is not None else None
    study = ctx.catalog.get_study(study_id)
    if study is None:
        raise not_found("study", study_id)
    if instances_purged(ctx.catalog, study_id):
        raise _purged(study_id)
    if model is not None and model not in registry.available():
        raise Problem(404, "unknown-model", f"unknown model {model!r}; known: {', '.join(registry.available())}")
    if study.state not in (StudyState.ROUTED, StudyState.UNROUTED):
        raise Problem(409, "not-routed", f"study {study_id} is {study.state}; it is rerun once routed")
    new_jobs: list[JobSpec] = []
    if model is not None:
        current = [j for j in ctx.catalog.jobs_of_study(study_id) if j.generation == study.generation]
        dests = [d for r in ctx.settings.rules if model in r.models for d in r.send_to]
        dests += [d for j in current for d in j.destinations]
        modalities = set(registry.manifest(model).modalities)
        have = {j.series_id for j in current if j.model == model}
        new_jobs = [JobSpec(s.id, model, RERUN_RULE, tuple(dict.fromkeys(dests)))
                    for s in ctx.catalog.series_of_study(study_id) if s.modality in modalities and s.id not in have]
    ids = ctx.catalog.rerun_study(study_id, ctx.clock(), model=model, new_jobs=new_jobs)
    if not ids:
        states = ", ".join(str(s) for s in RERUNNABLE)
        raise Problem(409, "nothing-to-rerun", f"study {study_id} has no {states} job"
                      + (f" of {model} and no series it takes" if model else "") + " in its current generation")
    log.info("study #%d: %d job(s) queued for a rerun (API)", study_id, len(ids))
    return RerunOut(study_id=study_id, generation=study.generation, jobs=ids)


@router.post("/destinations/{name}/pause", summary="Hold deliveries to a destination", responses=NOT_FOUND)
def pause_destination(ctx: Ctx, name: str) -> DestinationOut:
    destination_of(ctx, name)  # 404 for an unknown name
    ctx.catalog.set_destination_paused(name, True, ctx.clock())
    log.info("destination %s paused (API)", name)
    return destination_of(ctx, name)


@router.post("/destinations/{name}/resume", summary="Send held deliveries to a destination again",
             responses=NOT_FOUND)
def resume_destination(ctx: Ctx, name: str) -> DestinationOut:
    destination_of(ctx, name)
    ctx.catalog.set_destination_paused(name, False, ctx.clock())
    log.info("destination %s resumed (API)", name)
    return destination_of(ctx, name)
