"""Where a worker gets a job's inputs and leaves its outcome: the seam between the pipeline
(:func:`workers.pipeline.run_job`) and the node.

:class:`JobSource` is what the pipeline needs; :class:`LocalSource` is the direct path (a worker on a
host with the catalog and the spool), :class:`workers.remote.RemoteSource` the node's worker API (a
worker host with neither). Either way the node records outcomes with :mod:`node.job_results`, fenced by
the claiming attempt (:class:`node.policy.Holder`): a worker whose job was given to another one after
it was presumed lost gets ``False``/``None`` back and drops what it has.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.dataset import Dataset

from node.catalog import Catalog
from node.catalog_ops import JobTimings
from node.config import Settings
from node.job_results import Outcome, ResultObject, end_attempt, record_job_results
from node.policy import Holder, JobPolicy, job_policy, worker_identity
from node.schema import Job, JobState
from node.spool import Spool


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker holds: the attempt it runs and who runs it."""

    id: int
    study_id: int
    model: str
    attempt: int
    """The job's ``attempts`` after this claim (the fencing token, with ``worker``)."""
    worker: str
    """``host:pid`` of this worker process, as recorded on the job."""
    leave_out: frozenset[str] = frozenset()
    """Manifest objects not to make for this job (``PDF`` when the inputs were de-identified)."""

    @property
    def holder(self) -> Holder:
        return Holder(self.attempt, self.worker)


class JobSource(Protocol):
    """What the pipeline reads a job from and reports its outcome to."""

    def claim(self, job_id: int) -> ClaimedJob | None:
        """queued -> running for this worker; None when the job is not to be run here (finished,
        running elsewhere)."""

    def series_key(self, job: ClaimedJob) -> Hashable | None:
        """What names exactly the files :meth:`inputs` hands out for the job, known before they are
        fetched: equal keys, equal files (the worker's :class:`workers.load.SeriesCache`); None when
        it cannot tell (nothing is cached then)."""

    def inputs(self, job: ClaimedJob) -> list[Path]:
        """The files of the job's series."""

    def prior_inputs(self, job: ClaimedJob) -> list[Path] | None:
        """The files of the series' prior (registration models); None when there is none."""

    def predecessor(self, job: ClaimedJob, variant: str) -> Dataset | None:
        """The newest SR of ``variant`` an earlier run of this job wrote (Predecessor Documents)."""

    def submit(self, job: ClaimedJob, objects: Sequence[ResultObject], *, state: JobState = JobState.DONE,
               reason: str | None = None, timings: JobTimings | None = None) -> bool:
        """Hand the results over (the job ends in ``state``); False: this attempt no longer holds the job."""

    def end_attempt(self, job: ClaimedJob, outcome: Outcome, reason: str) -> JobState | None:
        """End a failed attempt; the job's new state, None when this attempt no longer holds the job."""

    def release(self, job: ClaimedJob) -> None:
        """The attempt is over: drop what was kept for it (temporary files)."""


class LocalSource:
    """The direct path: the catalog and the spool of this host."""

    def __init__(self, settings: Settings, catalog: Catalog, spool: Spool, clock: Callable[[], float]) -> None:
        self.settings, self.catalog, self.spool, self.clock = settings, catalog, spool, clock
        self._jobs: dict[int, tuple[Job, JobPolicy]] = {}
        self._inputs: dict[int, list[Path]] = {}
        """The files of each held job's series, as first listed during the attempt."""

    def claim(self, job_id: int) -> ClaimedJob | None:
        policy, worker = job_policy(self.settings), worker_identity()
        job = self.catalog.claim_job(job_id, self.clock(), worker=worker, policy=policy)
        if job is None:
            return None
        self._jobs[job.id] = (job, policy)
        return ClaimedJob(job.id, job.study_id, job.model, job.attempts, worker)

    def _paths(self, series_id: int) -> list[Path]:
        return [self.spool.path(i.path) for i in self.catalog.instances_of_series(series_id)]

    def series_key(self, job: ClaimedJob) -> Hashable | None:
        """The series id and each file's path, size and modification time (listed once per attempt: the
        files :meth:`inputs` then hands out are these, even if an instance arrived in between)."""
        files = []
        for path in self.inputs(job):
            try:
                st = path.stat()
            except OSError:  # a file gone: not cached, the load reports it
                return None
            files.append((str(path), st.st_size, st.st_mtime_ns))
        return ("local", self._jobs[job.id][0].series_id, tuple(files))

    def inputs(self, job: ClaimedJob) -> list[Path]:
        if job.id not in self._inputs:
            self._inputs[job.id] = self._paths(self._jobs[job.id][0].series_id)
        return self._inputs[job.id]

    def prior_inputs(self, job: ClaimedJob) -> list[Path] | None:
        prior = self.catalog.prior_series(self._jobs[job.id][0])
        return None if prior is None else self._paths(prior.id)

    def predecessor(self, job: ClaimedJob, variant: str) -> Dataset | None:
        previous = self.catalog.previous_result(self._jobs[job.id][0], "SR", variant)
        return None if previous is None else pydicom.dcmread(self.spool.path(previous.path))

    def submit(self, job: ClaimedJob, objects: Sequence[ResultObject], *, state: JobState = JobState.DONE,
               reason: str | None = None, timings: JobTimings | None = None) -> bool:
        written = record_job_results(self.catalog, self.spool, self._jobs[job.id][0], objects, self.clock,
                                     state=state, reason=reason, timings=timings, holder=job.holder)
        return written is not None

    def end_attempt(self, job: ClaimedJob, outcome: Outcome, reason: str) -> JobState | None:
        return end_attempt(self.catalog, job.id, outcome, reason, self._jobs[job.id][1], self.clock(),
                           holder=job.holder)

    def release(self, job: ClaimedJob) -> None:
        self._jobs.pop(job.id, None)
        self._inputs.pop(job.id, None)
