"""Event detection: the facts the node's loops already write to the catalog, turned into
:class:`~node.notify.events.Event` s with stable keys.

=====================  ===============================================  ======================================
event                  found as                                         key
=====================  ===============================================  ======================================
job-failed             a job in state ``failed``                        ``job-failed:<job>:<finished_at>``
worker-lost            a job whose error says "worker lost"             ``worker-lost:<job>:<attempt>``
worker-lost            a worker's heartbeat silent for                  ``worker-lost:<host>:<pid>:<started>``
                       ``queue.worker_lost_seconds``
results                a job ``done`` (of a model a target lists)       ``results:<job>:<started_at>``
delivery-late          deliveries of a study to a destination still     ``delivery-late:<dest>:<study>:<first
                       pending ``delivery_late_minutes`` after their    delivery id>:<pending since>``
                       first attempt (or their job's latest results)
destination-down       every pass to a destination failed for           ``destination-down:<dest>:<since>``
                       ``destination_down_minutes`` (``on_batch``)
destination-recovered  a pass delivered something again                 ``destination-recovered:<dest>:<id>``
disk-high              usage at or above the high watermark             ``disk-high:<since>``
disk-recovered         usage back below the low watermark               ``disk-recovered:<id>``
=====================  ===============================================  ======================================

Facts with a time (failed, lost, results) are scanned from a durable mark (``notify_marks.since``, set
when the notifier first ran: older facts are never announced) minus :data:`SCAN_OVERLAP_SECONDS`, which
absorbs workers' clock skew and late commits; keys make the overlap harmless.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import func, select

from node.catalog import Catalog
from node.config import Settings
from node.notify.events import Event, iso, study_ref
from node.notify.outbox import Outbox
from node.schema import Delivery, DeliveryState, DestinationState, Job, JobState, Result, WorkerHeartbeat
from node.send.deliver import DeliveryBatch

SCAN_OVERLAP_SECONDS = 600.0
"""Facts this much older than the last scan are looked at again (dedup by key)."""

WORKER_LOST = "worker lost"
"""What :meth:`node.catalog.Catalog.requeue_abandoned` and ``claim_job`` write into ``jobs.error``."""

UsageFn = Callable[[], tuple[int, int, int, float]]
"""(total, used, free bytes, used percent) of the storage filesystem."""


class DestinationHealth:
    """Per destination, when its current run of failed delivery passes began and when it last took
    something; fed by :class:`node.send.deliver.Deliverer`'s ``on_batch`` (thread-safe, in memory)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._failing: dict[str, tuple[float, str | None]] = {}
        self._last_ok: dict[str, float] = {}

    def batch(self, batch: DeliveryBatch) -> None:
        now = self.clock()
        with self._lock:
            if batch.studies:  # the destination took something: it is up
                self._failing.pop(batch.destination, None)
                self._last_ok[batch.destination] = now
            elif batch.failed:
                since, _ = self._failing.get(batch.destination, (now, None))
                self._failing[batch.destination] = (since, batch.error)

    def failing(self) -> dict[str, tuple[float, str | None]]:
        """Destination -> (failing since, last error)."""
        with self._lock:
            return dict(self._failing)

    def last_ok(self, name: str) -> float:
        with self._lock:
            return self._last_ok.get(name, -math.inf)


def _job(job: Job, **extra: Any) -> dict[str, Any]:
    return {"id": job.id, "model": job.model, "rule": job.rule, "attempts": job.attempts, **extra}


class Detector:
    """Scans the catalog (read-only transactions) for events; :class:`node.notify.Notifier` records them."""

    def __init__(self, settings: Settings, catalog: Catalog, outbox: Outbox, health: DestinationHealth,
                 usage: UsageFn | None) -> None:
        self.settings = settings
        self.ns = settings.notifications
        self.catalog = catalog
        self.outbox = outbox
        self.health = health
        self.usage = usage
        self.wanted = {e for t in self.ns.targets for e in t.events}
        """Events some target subscribes to; the others are not looked for."""
        lists = [t.models for t in self.ns.targets if "results" in t.events]
        self.result_models: list[str] | None = None if any(not m for m in lists) else sorted({m for ms in lists
                                                                                              for m in ms})
        """Models whose results are announced; None: every model."""

    def _ref(self, study_id: int) -> dict[str, Any]:
        return study_ref(study_id, self.ns.dashboard_url)

    def scan(self, now: float, since: float) -> list[Event]:
        """Every event found at ``now``; timed facts from ``since`` minus the overlap."""
        lo = since - SCAN_OVERLAP_SECONDS
        found: list[Event] = []
        if "job-failed" in self.wanted:
            found += self.jobs_failed(lo)
        if "worker-lost" in self.wanted:
            found += self.workers_lost(lo) + self.workers_silent(now, lo)
        if "results" in self.wanted:
            found += self.results(lo)
        if "destination-down" in self.wanted:
            found += self.destinations(now)
        if "delivery-late" in self.wanted:
            found += self.deliveries_late(now)
        if "disk-high" in self.wanted and self.usage is not None:
            found += self.disk(now)
        return found

    def jobs_failed(self, lo: float) -> list[Event]:
        with self.catalog.reading() as s:
            jobs = list(s.scalars(select(Job).where(Job.state == JobState.FAILED, Job.finished_at >= lo)
                                  .order_by(Job.id)))
            return [Event(f"job-failed:{j.id}:{j.finished_at or 0:.3f}", "job-failed",
                          {"study": self._ref(j.study_id),
                           "job": _job(j, error=j.error, worker=j.worker,
                                       finished_at=iso(j.finished_at) if j.finished_at else None)})
                    for j in jobs]

    def workers_lost(self, lo: float | None = None, job_ids: Iterable[int] | None = None) -> list[Event]:
        """Jobs whose worker vanished: updated since ``lo``, or the ``job_ids`` just requeued."""
        q = select(Job).where(Job.error.contains(WORKER_LOST))
        q = q.where(Job.id.in_(list(job_ids))) if job_ids is not None else q.where(Job.updated_at >= (lo or 0.0))
        out = []
        with self.catalog.reading() as s:
            for j in s.scalars(q.order_by(Job.id)):
                if j.state not in (JobState.QUEUED, JobState.RUNNING, JobState.FAILED):
                    continue
                # claimed again by a worker: its attempt counter already moved on to the next attempt
                attempt = j.attempts - 1 if j.state == JobState.RUNNING else j.attempts
                out.append(Event(f"worker-lost:{j.id}:{attempt}", "worker-lost",
                                 {"study": self._ref(j.study_id),
                                  "job": _job(j, attempt=attempt, state=str(j.state), error=j.error,
                                              # running: claimed by another worker since, the lost one is unknown
                                              worker=None if j.state == JobState.RUNNING else j.worker)}))
        return out

    def workers_silent(self, now: float, lo: float) -> list[Event]:
        """Worker processes whose heartbeat stopped (killed, host down) without removing its row."""
        silent_since = now - self.settings.queue.worker_lost_seconds
        with self.catalog.reading() as s:
            return [Event(f"worker-lost:{h.host}:{h.pid}:{h.started_at:.0f}", "worker-lost",
                          {"worker": {"host": h.host, "pid": h.pid, "queues": h.queues, "job_id": h.job_id,
                                      "last_seen_at": iso(h.last_seen_at)},
                           "silent_seconds": round(now - h.last_seen_at)})
                    for h in s.scalars(select(WorkerHeartbeat)
                                       .where(WorkerHeartbeat.last_seen_at < silent_since,
                                              WorkerHeartbeat.last_seen_at >= lo)
                                       .order_by(WorkerHeartbeat.id))]

    def results(self, lo: float) -> list[Event]:
        q = select(Job).where(Job.state == JobState.DONE, Job.updated_at >= lo)
        if self.result_models is not None:
            q = q.where(Job.model.in_(self.result_models))
        with self.catalog.reading() as s:
            jobs = list(s.scalars(q.order_by(Job.id)))
            kinds: dict[int, dict[str, int]] = {}
            if jobs:
                for job_id, kind, n in s.execute(
                        select(Result.job_id, Result.kind, func.count()).where(Result.job_id.in_([j.id for j in jobs]))
                        .group_by(Result.job_id, Result.kind)):
                    kinds.setdefault(job_id, {})[kind] = n
            return [Event(f"results:{j.id}:{j.started_at or 0:.3f}", "results",
                          {"study": self._ref(j.study_id),
                           "job": _job(j, model_version=j.model_version, destinations=list(j.destinations)),
                           "results": kinds.get(j.id, {})}, model=j.model)
                    for j in jobs]

    def deliveries_late(self, now: float) -> list[Event]:
        """Per (study, destination), pending deliveries that failed and have been pending for
        ``delivery_late_minutes`` (since their first attempt, or their job's latest results: a rerun
        sends again); not for a paused destination, nor one announced down (or recovered less than a
        backoff ago: its held deliveries are still to come round)."""
        cutoff = now - self.ns.delivery_late_minutes * 60
        with self.catalog.reading() as s:
            rows = s.execute(
                select(Delivery.id, Delivery.destination, Delivery.attempts, Delivery.first_attempt_at,
                       Delivery.last_error, Job.study_id, Job.updated_at)
                .join(Result, Result.id == Delivery.result_id).join(Job, Job.id == Result.job_id)
                .where(Delivery.state == DeliveryState.PENDING, Delivery.last_error.is_not(None),
                       Delivery.first_attempt_at <= cutoff, Job.updated_at <= cutoff,
                       Delivery.destination.not_in(select(DestinationState.name)
                                                   .where(DestinationState.paused.is_(True))))
                .order_by(Delivery.id)).all()
        groups: dict[tuple[str, int], list[Any]] = {}
        for d in rows:
            groups.setdefault((d.destination, d.study_id), []).append(d)
        quiet: dict[str, bool] = {}
        out = []
        for (dest, study_id), ds in groups.items():
            if dest not in quiet:
                quiet[dest] = self._destination_announced(dest, now)
            if quiet[dest]:
                continue
            first = min(max(d.first_attempt_at or now, d.updated_at) for d in ds)
            out.append(Event(f"delivery-late:{dest}:{study_id}:{ds[0].id}:{first:.0f}", "delivery-late",
                             {"study": self._ref(study_id), "destination": dest,
                              "deliveries": {"pending": len(ds), "ids": [d.id for d in ds][:20],
                                             "attempts": max(d.attempts for d in ds),
                                             "pending_since": iso(first), "last_error": ds[-1].last_error},
                              "pending_minutes": round((now - first) / 60)}))
        return out

    def _destination_announced(self, dest: str, now: float) -> bool:
        if "destination-down" not in self.wanted:
            return False
        last = self.outbox.last_episode_event(dest, ("destination-down", "destination-recovered"))
        if last is None:
            return False
        return last.event == "destination-down" or last.created_at > now - self.settings.send.retry_max_seconds

    def destinations(self, now: float) -> list[Event]:
        out = []
        failing = self.health.failing()
        down_after = self.ns.destination_down_minutes * 60
        names = [d.name for d in self.settings.destinations]
        for name in names:
            episode = self.outbox.open_episode(name, "destination-down", "destination-recovered")
            if episode is not None:
                if self.health.last_ok(name) > episode.created_at:
                    since = episode.payload.get("failing_since")
                    out.append(Event(f"destination-recovered:{name}:{episode.id}", "destination-recovered",
                                     {"destination": name, "failing_since": since,
                                      "down_event": episode.id}, subject=name))
                continue
            if name in failing and failing[name][0] <= now - down_after:
                since, error = failing[name]
                out.append(Event(f"destination-down:{name}:{since:.0f}", "destination-down",
                                 {"destination": name, "failing_since": iso(since),
                                  "failing_minutes": round((now - since) / 60), "last_error": error,
                                  "pending_deliveries": self._pending(name)}, subject=name))
        return out

    def _pending(self, dest: str) -> int:
        with self.catalog.reading() as s:
            return int(s.scalar(select(func.count()).select_from(Delivery)
                                .where(Delivery.destination == dest, Delivery.state == DeliveryState.PENDING)) or 0)

    def disk(self, now: float) -> list[Event]:
        assert self.usage is not None
        total, _used, free, percent = self.usage()
        st = self.settings.storage
        facts = {"disk": {"used_percent": round(percent, 1), "free_bytes": free, "total_bytes": total,
                          "high_watermark_percent": st.high_watermark_percent,
                          "low_watermark_percent": st.low_watermark_percent}}
        episode = self.outbox.open_episode("disk", "disk-high", "disk-recovered")
        if episode is None and percent >= st.high_watermark_percent:
            return [Event(f"disk-high:{now:.0f}", "disk-high", facts, subject="disk")]
        if episode is not None and percent < st.low_watermark_percent:
            return [Event(f"disk-recovered:{episode.id}", "disk-recovered", facts, subject="disk")]
        return []
