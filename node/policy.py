"""How jobs are retried, and when a running job has lost its worker: its worker's heartbeat row is
stale (on any host), its local pid is dead, or, last resort, its lease (the longest time limit plus a
margin) ran out."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.config import Settings
from node.queue import longest_time_limit
from node.schema import Job, JobState, WorkerHeartbeat

JOB_LEASE_MARGIN_SECONDS = 120
"""A job running longer than its time limit plus this margin has lost its worker."""


@dataclass(frozen=True)
class JobPolicy:
    """How jobs are retried and when a running job counts as abandoned."""

    max_attempts: int = 3
    retry_initial_seconds: float = 30.0
    retry_max_seconds: float = 600.0
    lease_seconds: float = 3600.0
    """A job running longer than this has lost its worker (longer than the job time limit)."""
    local_host: str = ""
    """This host's name: a job claimed here by a pid that no longer exists is abandoned at once."""
    worker_lost_seconds: float = 30.0
    """A job claimed longer ago than this, whose worker's heartbeat is older than this, is abandoned."""

    def backoff(self, attempts: int) -> float:
        return float(min(self.retry_max_seconds, self.retry_initial_seconds * 2 ** max(0, attempts - 1)))

    def abandoned(self, job: Job, now: float, last_seen: float | None = None) -> bool:
        """Whether running ``job`` lost its worker; ``last_seen``: its worker's last heartbeat (the
        ``workers`` row of the job's ``host:pid``), None when there is no row (then only the local pid
        and the lease decide)."""
        if job.updated_at < now - self.lease_seconds:
            return True
        host, _, pid = (job.worker or "").rpartition(":")
        if self.local_host and host == self.local_host and pid.isdigit() and not pid_alive(int(pid)):
            return True
        claimed = job.started_at if job.started_at is not None else job.updated_at
        lost = now - self.worker_lost_seconds
        return last_seen is not None and last_seen < lost and claimed < lost


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_policy(settings: Settings) -> JobPolicy:
    q = settings.queue
    return JobPolicy(
        max_attempts=q.job_max_attempts,
        retry_initial_seconds=q.job_retry_initial_seconds,
        retry_max_seconds=q.job_retry_max_seconds,
        lease_seconds=longest_time_limit(settings) + JOB_LEASE_MARGIN_SECONDS,  # per-model limits too
        local_host=socket.gethostname(),
        worker_lost_seconds=q.worker_lost_seconds,
    )


def split_identity(worker: str) -> tuple[str, int] | None:
    """(host, pid) of a worker identity ``host:pid``; None if it is not one."""
    host, _, pid = worker.rpartition(":")
    return (host, int(pid)) if host and pid.isdigit() else None


def worker_identity(name: str | None = None) -> str:
    """``host:pid`` of this process (``name`` instead of the host name: a remote worker's
    ``remote.name``), as recorded on the jobs it claims and in the ``workers`` table."""
    return f"{name or socket.gethostname()}:{os.getpid()}"


class Holder(NamedTuple):
    """The attempt that claimed a job: its ``attempts`` count then, and its worker (``host:pid``)."""

    attempt: int
    worker: str


def holds(job: Job | None, holder: Holder) -> bool:
    """Whether ``holder`` holds ``job`` (running, same attempt and worker)."""
    return job is not None and job.state == JobState.RUNNING and (job.attempts, job.worker) == holder


def held_job(s: Session, job_id: int, holder: Holder) -> Job | None:
    """The job, row-locked, if ``holder`` still holds it (:func:`holds`)."""
    job = s.get(Job, job_id, with_for_update=True)
    return job if holds(job, holder) else None


def last_seen(s: Session, worker: str | None) -> float | None:
    """The last heartbeat of worker ``host:pid`` (its ``workers`` row), None without one."""
    found = split_identity(worker or "")
    if found is None:
        return None
    return s.scalar(select(WorkerHeartbeat.last_seen_at).where(WorkerHeartbeat.host == found[0],
                                                               WorkerHeartbeat.pid == found[1]))
