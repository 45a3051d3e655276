"""The only place that sends queue messages. A message is a job id; the catalog holds the rest.

With a :class:`Dispatch` the enqueuer sends only what fits each queue's in-flight window, most
urgent first, fair across studies (:mod:`node.dispatch`); without one it sends every due job (tests
of other stages). A job queued but not sent has no ``enqueued_at``, so the catalog's stale-message
resend never mistakes it for a lost message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from celery import Celery
from sqlalchemy import and_, func, or_, select

from node.catalog import Catalog
from node.config import Settings
from node.dispatch import Busy, OffpeakWindow, Waiting, choose
from node.queue import DEFAULT_QUEUE, HARD_LIMIT_GRACE_SECONDS, TASK_NAME, model_time_limit
from node.schema import Job, JobState

log = logging.getLogger("node.enqueue")

UNCLAIMED_GRACE_SECONDS = 60.0
"""A message no worker claimed this long after it was sent stops counting in its queue's window (the
broker lost it, or fewer workers serve the queue than ``queue.in_flight`` says), so one lost message
cannot hold a queue until the catalog resends it (``Catalog.resend_stale_queued``, after the lease)."""


@dataclass(frozen=True)
class Dispatch:
    """How the enqueuer orders and limits what it sends (from ``queue:`` and ``models:``)."""

    capacity: Callable[[str], int]
    """Queue -> messages allowed in flight."""
    offpeak: OffpeakWindow
    time_limit: Callable[[str], int]
    """Model -> soft time limit in seconds (sent with each message; the worker enforces it)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Dispatch:
        q = settings.queue
        return cls(capacity=lambda queue: q.in_flight.get(queue, q.worker_concurrency),
                   offpeak=OffpeakWindow.parse(q.offpeak_window),
                   time_limit=lambda model: model_time_limit(settings, model))


class Enqueuer:
    def __init__(self, app: Celery, catalog: Catalog, clock: Callable[[], float],
                 queue_of: Callable[[str], str] = lambda model: DEFAULT_QUEUE,
                 dispatch: Dispatch | None = None) -> None:
        self.app = app
        self.catalog = catalog
        self.clock = clock
        self.queue_of = queue_of
        self.dispatch = dispatch

    def enqueue(self, job_id: int, model: str, priority: str = "normal") -> bool:
        """Send one job to its model's queue; on a broker error it stays unsent and is tried again."""
        queue = self.queue_of(model)
        options: dict[str, object] = {}
        if self.dispatch is not None:
            soft = self.dispatch.time_limit(model)
            options = {"soft_time_limit": soft, "time_limit": soft + HARD_LIMIT_GRACE_SECONDS}
        try:
            self.app.send_task(TASK_NAME, args=[job_id], queue=queue, **options)
        except Exception as exc:
            log.warning("job #%d not enqueued yet (broker: %s); will retry", job_id, type(exc).__name__)
            return False
        self.catalog.mark_enqueued(job_id, self.clock())
        log.info("job #%d (%s, %s) enqueued on %s", job_id, model, priority, queue)
        return True

    def enqueue_pending(self) -> int:
        """Send the queued jobs that have no message yet (those that fit, in order, with a
        :class:`Dispatch`); returns how many were sent."""
        now = self.clock()
        if self.dispatch is None:
            return sum(self.enqueue(j, m) for j, m in self.catalog.jobs_to_enqueue(now))
        sent = 0
        for job in self.next_jobs(now):
            if not self.enqueue(job.job_id, job.model, job.priority):
                break  # the broker is down: keep the order for the next pass
            sent += 1
        return sent

    def next_jobs(self, now: float) -> list[Waiting]:
        """The jobs to send now, in order (:func:`node.dispatch.choose` on the catalog's state)."""
        assert self.dispatch is not None
        sent_or_running = or_(and_(Job.state == JobState.QUEUED, Job.enqueued_at >= now - UNCLAIMED_GRACE_SECONDS),
                              Job.state == JobState.RUNNING)
        with self.catalog.session() as s:
            waiting = [Waiting(i, m, self.queue_of(m), p, st, c) for i, m, p, st, c in s.execute(
                select(Job.id, Job.model, Job.priority, Job.study_id, Job.created_at)
                .where(Job.state == JobState.QUEUED, Job.enqueued_at.is_(None), Job.not_before <= now))]
            if not waiting:
                return []
            busy = [Busy(self.queue_of(m), st, p) for m, st, p in s.execute(
                select(Job.model, Job.study_id, Job.priority).where(sent_or_running))]
            studies = list({w.study_id for w in waiting})
            served = {st: t for st, t in s.execute(
                select(Job.study_id, func.max(Job.first_enqueued_at))
                .where(Job.study_id.in_(studies)).group_by(Job.study_id)) if t is not None}
        return choose(waiting, busy, capacity=self.dispatch.capacity,
                      offpeak_open=self.dispatch.offpeak.contains(now), last_served=served)
