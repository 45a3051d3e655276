"""The REST API, operations (``GET /api/v1/...``, permission ``api.read``): queue depth per worker
queue, workers (heartbeats), peers (since the node started) and hourly stats of the last day: what
the dashboard's operations page shows, as JSON (disk usage by area: ``GET /api/v1/storage``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from node.http.api import PREFIX, Ctx
from node.overview_ops import hourly_stats, queue_depths, worker_facts

router = APIRouter(prefix=PREFIX, tags=["api operations"])


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class QueueOut(_Out):
    queue: str
    queued: int
    running: int
    awaiting_prior: int
    models: list[str]


class WorkerOut(_Out):
    host: str
    pid: int
    queues: list[str]
    started_at: float
    last_seen_at: float
    alive: bool = Field(description="its heartbeat is recent")
    job_id: int | None = Field(description="the job it runs now")
    job_model: str | None
    job_study_id: int | None
    gpu: str | None = Field(description="the CUDA device in use, if any")


class PeerOut(_Out):
    door: str = Field(description="dimse or stow")
    source: str = Field(description="calling AE title (DIMSE) or token name (STOW-RS)")
    associations: int
    instances: int
    bytes: int
    last_association_at: float | None
    last_instance_at: float | None


class HourOut(_Out):
    start: float
    studies: int = Field(description="studies whose results were all delivered in this hour")
    instances: int = Field(description="instances received (by their study's last arrival)")
    instances_per_second: float
    turnaround_p50: float | None = Field(description="seconds, last instance received -> last delivery sent")
    turnaround_p95: float | None


class StatsOut(_Out):
    now: float
    hours: list[HourOut]


@router.get("/queues", summary="Unfinished jobs per worker queue")
def list_queues(ctx: Ctx) -> list[QueueOut]:
    return [QueueOut(queue=q.queue, queued=q.queued, running=q.running, awaiting_prior=q.awaiting_prior,
                     models=q.models) for q in queue_depths(ctx.catalog, ctx.settings)]


@router.get("/workers", summary="Worker processes seen in the last day (heartbeats), their current job and GPU")
def list_workers(ctx: Ctx) -> list[WorkerOut]:
    return [WorkerOut(host=w.host, pid=w.pid, queues=w.queues, started_at=w.started_at, last_seen_at=w.last_seen_at,
                      alive=w.alive, job_id=w.job_id, job_model=w.job_model, job_study_id=w.job_study_id, gpu=w.gpu)
            for w in worker_facts(ctx.catalog, ctx.clock(), ctx.settings.queue.worker_lost_seconds)]


@router.get("/peers", summary="Senders since the node started (in memory): associations, instances, last seen")
def list_peers(ctx: Ctx) -> list[PeerOut]:
    peers = ctx.metrics.peers() if ctx.metrics is not None else []
    return [PeerOut(door=p.door, source=p.source, associations=p.associations, instances=p.instances, bytes=p.bytes,
                    last_association_at=p.last_association_at, last_instance_at=p.last_instance_at) for p in peers]


@router.get("/stats", summary="Hourly turnaround (p50, p95) and throughput over the last hours")
def get_stats(ctx: Ctx, hours: Annotated[int, Query(ge=1, le=168, description="hours back")] = 24) -> StatsOut:
    now = ctx.clock()
    return StatsOut(now=now, hours=[
        HourOut(start=h.start, studies=h.studies, instances=h.instances,
                instances_per_second=round(h.instances_per_second, 4), turnaround_p50=h.turnaround_p50,
                turnaround_p95=h.turnaround_p95) for h in hourly_stats(ctx.catalog, now, hours)])
