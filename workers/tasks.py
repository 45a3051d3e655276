"""Celery tasks: thin. Parse the job id, run the pipeline, nothing else.

The worker context (catalog engine and spool, or the node API client of a remote worker; warm models)
is built lazily in each worker child process, after the fork: database connections and CUDA must not
cross a fork.
"""

from __future__ import annotations

import os

from celery import Celery

from node.config import Settings
from node.queue import TASK_NAME
from workers.pipeline import WorkerContext, run_job


def register(app: Celery, settings: Settings) -> None:
    """Register the job task on ``app``; contexts are per process (keyed by pid)."""
    contexts: dict[int, WorkerContext] = {}

    def context() -> WorkerContext:
        pid = os.getpid()
        if pid not in contexts:
            contexts.clear()
            contexts[pid] = WorkerContext.from_settings(settings)
        return contexts[pid]

    @app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)
    def run_job_task(job_id: int) -> str:
        return str(run_job(context(), int(job_id)))
