"""The ``workers`` table rows (worker heartbeats): written every few seconds by each worker process,
directly (:mod:`workers.heartbeat`, a worker with the catalog) or through the node's worker API (a
remote worker, :mod:`node.http.api_worker`); one function writes them either way. A row not updated
for ``queue.worker_lost_seconds`` is a worker lost (:meth:`node.policy.JobPolicy.abandoned`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select

from node.catalog import Catalog
from node.schema import WorkerHeartbeat

FORGET_SECONDS = 7 * 86400.0
"""Rows of workers not seen for this long are deleted (by any worker's heartbeat)."""


@dataclass(frozen=True)
class Beat:
    """One heartbeat of a worker process."""

    host: str
    pid: int
    queues: str
    """The queues it consumes, comma-separated."""
    started_at: float
    job_id: int | None = None
    gpu: str | None = None


def write_beat(catalog: Catalog, beat: Beat, now: float) -> None:
    """Create or update the process's row (last seen ``now``); rows unseen for a week go."""
    values = {"queues": beat.queues[:256], "last_seen_at": now, "job_id": beat.job_id,
              "gpu": None if beat.gpu is None else beat.gpu[:128]}
    with catalog.session() as s:
        row = s.scalar(select(WorkerHeartbeat).where(WorkerHeartbeat.host == beat.host,
                                                     WorkerHeartbeat.pid == beat.pid))
        if row is None:
            s.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.last_seen_at < now - FORGET_SECONDS))
            s.add(WorkerHeartbeat(host=beat.host, pid=beat.pid, started_at=beat.started_at, **values))
        else:
            for key, value in values.items():
                setattr(row, key, value)


def remove_beat(catalog: Catalog, host: str, pid: int) -> None:
    """Remove the process's row (a clean exit is not a lost worker)."""
    with catalog.session() as s:
        s.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.host == host, WorkerHeartbeat.pid == pid))
