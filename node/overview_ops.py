"""Read-only operational views of the catalog for the dashboard and ``/api/v1`` (:mod:`node.http.api_ops`):
queue depth per worker queue, worker heartbeats, hourly turnaround and throughput, failing deliveries,
deliveries per study and destination. Aggregate queries; no table is loaded whole, no patient data.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import case, func, select

from node.catalog import Catalog
from node.config import Settings
from node.overview import DeliveryFacts, _reading
from node.schema import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    Series,
    Study,
    WorkerHeartbeat,
)

HOUR = 3600.0


@dataclass(frozen=True)
class QueueDepth:
    queue: str
    queued: int
    running: int
    awaiting_prior: int
    models: list[str]
    """Models on this queue: configured under ``models:``, named by a rule, or with unfinished jobs."""


def queue_depths(catalog: Catalog, settings: Settings) -> list[QueueDepth]:
    """Unfinished jobs per worker queue (each model's ``models.<name>.queue``; ``cpu`` by default)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    models: dict[str, set[str]] = defaultdict(set)
    for name in {*settings.models, *(m for rule in settings.rules for m in rule.models)}:
        models[settings.model_settings(name).queue].add(name)
    models.setdefault("cpu", set())
    with _reading(catalog) as s:
        rows = s.execute(select(Job.model, Job.state, func.count())
                         .where(Job.state.in_((JobState.QUEUED, JobState.RUNNING, JobState.AWAITING_PRIOR)))
                         .group_by(Job.model, Job.state)).all()
    for model, state, n in rows:
        queue = settings.model_settings(model).queue
        models[queue].add(model)
        counts[queue][str(state)] += n
    return [QueueDepth(q, counts[q][JobState.QUEUED], counts[q][JobState.RUNNING], counts[q][JobState.AWAITING_PRIOR],
                       sorted(models[q])) for q in sorted(models)]


@dataclass(frozen=True)
class WorkerFacts:
    host: str
    pid: int
    queues: list[str]
    started_at: float
    last_seen_at: float
    alive: bool
    job_id: int | None
    job_model: str | None
    job_study_id: int | None
    gpu: str | None


def worker_facts(catalog: Catalog, now: float, alive_seconds: float,
                 window: float = 24 * HOUR) -> list[WorkerFacts]:
    """Worker processes seen in the last ``window`` seconds, most recent first; each one's current job
    (its heartbeat's, else a running job it claimed)."""
    with _reading(catalog) as s:
        beats = list(s.scalars(select(WorkerHeartbeat).where(WorkerHeartbeat.last_seen_at >= now - window)
                               .order_by(WorkerHeartbeat.last_seen_at.desc(), WorkerHeartbeat.id)))
        running = {worker: (job_id, model, study_id) for job_id, worker, model, study_id in s.execute(
            select(Job.id, Job.worker, Job.model, Job.study_id).where(Job.state == JobState.RUNNING))}
        wanted = [b.job_id for b in beats if b.job_id is not None]
        jobs = {job_id: (job_id, model, study_id) for job_id, model, study_id in s.execute(
            select(Job.id, Job.model, Job.study_id).where(Job.id.in_(wanted)))} if wanted else {}
    out = []
    for b in beats:
        alive = now - b.last_seen_at <= alive_seconds
        job = (jobs.get(b.job_id) if b.job_id is not None else None) or running.get(f"{b.host}:{b.pid}")
        if not alive:
            job = None
        out.append(WorkerFacts(b.host, b.pid, [q for q in b.queues.split(",") if q], b.started_at, b.last_seen_at,
                               alive, job[0] if job else None, job[1] if job else None, job[2] if job else None,
                               b.gpu))
    return out


@dataclass
class HourStats:
    """One hour of the last day: studies whose results were all delivered in it (their turnaround:
    last instance received -> last delivery sent) and instances received (by their study's last
    arrival)."""

    start: float
    studies: int = 0
    turnaround_p50: float | None = None
    turnaround_p95: float | None = None
    instances: int = 0
    turnarounds: list[float] = field(default_factory=list, repr=False)

    @property
    def instances_per_second(self) -> float:
        return self.instances / HOUR


def percentile(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (0-100) of ``values`` by the nearest-rank method; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def hourly_stats(catalog: Catalog, now: float, hours: int = 24) -> list[HourStats]:
    """``hours`` buckets of one hour, oldest first, the last holding ``now``."""
    first = math.floor(now / HOUR) * HOUR - (hours - 1) * HOUR
    buckets = [HourStats(first + i * HOUR) for i in range(hours)]

    def bucket(t: float) -> HourStats | None:
        i = int((t - first) // HOUR)
        return buckets[i] if 0 <= i < hours else None

    per_study = (
        select(Job.study_id.label("study_id"), func.max(Delivery.sent_at).label("last_sent"),
               func.sum(case((Delivery.state == DeliveryState.PENDING, 1), else_=0)).label("pending"))
        .select_from(Delivery).join(Result, Result.id == Delivery.result_id).join(Job, Job.id == Result.job_id)
        .group_by(Job.study_id).subquery())
    with _reading(catalog) as s:
        delivered = s.execute(
            select(per_study.c.last_sent, Study.last_received_at)
            .join(Study, Study.id == per_study.c.study_id)
            .where(per_study.c.pending == 0, per_study.c.last_sent >= first)).all()
        received = s.execute(select(Study.last_received_at, Study.instance_count)
                             .where(Study.last_received_at >= first)).all()
    for last_sent, last_received in delivered:
        b = bucket(last_sent)
        if b is not None:
            b.studies += 1
            b.turnarounds.append(max(0.0, last_sent - last_received))
    for last_received, n in received:
        b = bucket(last_received)
        if b is not None:
            b.instances += n
    for b in buckets:
        b.turnaround_p50, b.turnaround_p95 = percentile(b.turnarounds, 50), percentile(b.turnarounds, 95)
    return buckets


def destination_states(catalog: Catalog, study_ids: Sequence[int]) -> dict[int, dict[str, dict[str, int]]]:
    """Study id -> destination -> delivery state -> count, plus ``failing``: pending deliveries whose
    last attempt failed (one grouped query for a page of studies)."""
    out: dict[int, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(dict))
    if not study_ids:
        return {}
    erred = func.sum(case((Delivery.last_error.is_not(None), 1), else_=0))
    with _reading(catalog) as s:
        for study_id, dest, state, n, failing in s.execute(
            select(Job.study_id, Delivery.destination, Delivery.state, func.count(), erred)
            .select_from(Delivery).join(Result, Result.id == Delivery.result_id).join(Job, Job.id == Result.job_id)
            .where(Job.study_id.in_(list(study_ids))).group_by(Job.study_id, Delivery.destination, Delivery.state)
        ):
            out[study_id][dest][str(state)] = n
            if state == DeliveryState.PENDING and failing:
                out[study_id][dest]["failing"] = int(failing)
    return {k: dict(v) for k, v in out.items()}


def failing_deliveries(catalog: Catalog, *, limit: int, offset: int) -> tuple[int, list[DeliveryFacts]]:
    """(total, pending deliveries whose last attempt failed, oldest first attempt first)."""
    with _reading(catalog) as s:
        q = (select(Delivery, Result.job_id, Job.study_id, Result.kind, Result.sop_instance_uid)
             .join(Result, Result.id == Delivery.result_id).join(Job, Job.id == Result.job_id)
             .where(Delivery.state == DeliveryState.PENDING, Delivery.last_error.is_not(None)))
        total = int(s.scalar(select(func.count()).select_from(q.subquery())) or 0)
        rows = s.execute(q.order_by(Delivery.id).limit(limit).offset(offset)).all()
        return total, [DeliveryFacts(d, job_id, sid, kind, uid) for d, job_id, sid, kind, uid in rows]


def result_series_uids(catalog: Catalog, sop_uids: Sequence[str]) -> dict[str, str]:
    """SOP Instance UID -> Series Instance UID of the result objects served as instances (WADO-RS)."""
    if not sop_uids:
        return {}
    with _reading(catalog) as s:
        return {sop: series for sop, series in s.execute(
            select(Instance.sop_instance_uid, Series.series_uid).join(Series, Series.id == Instance.series_id)
            .where(Instance.sop_instance_uid.in_(list(sop_uids))))}
