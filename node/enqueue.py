"""The only place that sends queue messages. A message is a job id; the catalog holds the rest."""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import Celery

from node.catalog import Catalog
from node.queue import DEFAULT_QUEUE, TASK_NAME

log = logging.getLogger("node.enqueue")


class Enqueuer:
    def __init__(self, app: Celery, catalog: Catalog, clock: Callable[[], float],
                 queue_of: Callable[[str], str] = lambda model: DEFAULT_QUEUE) -> None:
        self.app = app
        self.catalog = catalog
        self.clock = clock
        self.queue_of = queue_of

    def enqueue(self, job_id: int, model: str) -> bool:
        """Send one job to its model's queue; on a broker error it stays unsent and is tried again."""
        try:
            self.app.send_task(TASK_NAME, args=[job_id], queue=self.queue_of(model))
        except Exception as exc:
            log.warning("job #%d not enqueued yet (broker: %s); will retry", job_id, type(exc).__name__)
            return False
        self.catalog.mark_enqueued(job_id, self.clock())
        log.info("job #%d (%s) enqueued on %s", job_id, model, self.queue_of(model))
        return True

    def enqueue_pending(self) -> int:
        """Send every queued job that has no message yet; returns how many were sent."""
        return sum(self.enqueue(j, m) for j, m in self.catalog.jobs_to_enqueue(self.clock()))
