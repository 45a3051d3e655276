"""How jobs are retried, and when a running job has lost its worker (a lease, or a dead local pid)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from node.config import Settings
from node.queue import longest_time_limit
from node.schema import Job

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

    def backoff(self, attempts: int) -> float:
        return float(min(self.retry_max_seconds, self.retry_initial_seconds * 2 ** max(0, attempts - 1)))

    def abandoned(self, job: Job, now: float) -> bool:
        if job.updated_at < now - self.lease_seconds:
            return True
        host, _, pid = (job.worker or "").rpartition(":")
        return bool(self.local_host) and host == self.local_host and pid.isdigit() and not _pid_alive(int(pid))


def _pid_alive(pid: int) -> bool:
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
    )


def worker_identity() -> str:
    """``host:pid`` of this process, as recorded on the jobs it claims."""
    return f"{socket.gethostname()}:{os.getpid()}"
