"""The only place that sends queue messages. A message is a job id; the catalog holds the rest."""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import Celery

from node.catalog import Catalog
from workers.celery_app import DEFAULT_QUEUE, TASK_NAME

log = logging.getLogger("node.enqueue")


class Enqueuer:
    def __init__(self, app: Celery, catalog: Catalog, clock: Callable[[], float]) -> None:
        self.app = app
        self.catalog = catalog
        self.clock = clock

    def enqueue(self, job_id: int) -> bool:
        """Send one job; on a broker error the job stays unsent in the catalog and is tried again."""
        try:
            self.app.send_task(TASK_NAME, args=[job_id], queue=DEFAULT_QUEUE)
        except Exception as exc:
            log.warning("job #%d not enqueued yet (broker: %s); will retry", job_id, type(exc).__name__)
            return False
        self.catalog.mark_enqueued(job_id, self.clock())
        log.info("job #%d enqueued", job_id)
        return True

    def enqueue_pending(self) -> int:
        """Send every queued job that has no message yet; returns how many were sent."""
        return sum(self.enqueue(j) for j in self.catalog.jobs_to_enqueue(self.clock()))
