"""How a job's attempt ends in the catalog, whichever way its worker reached the node: results written
into the spool and recorded (with their deliveries, the stage timings and the resending of replaced
files), or a failed attempt skipped, failed or queued again. One place for both the direct path
(:class:`workers.source.LocalSource`, a worker with the catalog and the spool) and the remote
workers' API (:mod:`node.http.api_worker`).

Fencing: with a :class:`node.policy.Holder` nothing changes unless that attempt still holds the job
(running, the same attempt number and worker): a worker presumed lost whose job runs elsewhere now is
refused (``None``), so a job's results are recorded once in effect.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Literal

import pydicom
from pydicom.dataset import Dataset

from models.errors import InputError
from node.catalog import Catalog, ResultFile
from node.catalog_ops import JobTimings
from node.dicomweb.attributes import indexed_attributes
from node.policy import Holder, JobPolicy, holds
from node.schema import Job, JobState
from node.spool import Spool

log = logging.getLogger("node.job_results")

Outcome = Literal["skip", "fail", "retry"]
"""How a failed attempt ends: ``skipped``, ``failed`` at once, or queued again (until out of attempts)."""


@dataclass(frozen=True)
class ResultObject:
    """One encoded result object: its file's bytes, its variant, and its dataset when at hand."""

    data: bytes
    variant: str = ""
    dataset: Dataset | None = None
    """The dataset ``data`` encodes (parsed from ``data`` when None)."""


def result_file(ds: Dataset, rel: str, data: bytes, variant: str = "") -> ResultFile:
    """The catalog's record of a result object written at spool path ``rel`` as ``data``: sent to the
    destinations, and served over DICOMweb as an instance of its own series in the study."""
    meta = pydicom.dcmread(BytesIO(data), stop_before_pixels=True).file_meta
    return ResultFile(str(ds.Modality), str(ds.SOPInstanceUID), str(ds.SOPClassUID), rel, variant,
                      series_uid=str(ds.SeriesInstanceUID), transfer_syntax_uid=str(meta.TransferSyntaxUID),
                      size=len(data), indexed=indexed_attributes(ds))


def record_job_results(catalog: Catalog, spool: Spool, job: Job, objects: Sequence[ResultObject],
                       clock: Callable[[], float], *, state: JobState = JobState.DONE, reason: str | None = None,
                       timings: JobTimings | None = None, holder: Holder | None = None) -> list[ResultFile] | None:
    """Write ``objects`` into the spool's results of the job's study (replacing earlier files of the same
    UIDs) and record them with their deliveries, the job ending in ``state`` (``skipped`` with ``reason``
    for a not-assessed report); then the timings, and deliveries of replaced files go back to pending.
    None: ``holder`` no longer holds the job, nothing was recorded. :class:`InputError` for an object of
    another study or one that is not DICOM."""
    if holder is not None and not holds(catalog.get_job(job.id), holder):
        return None
    study = catalog.get_study(job.study_id)
    if study is None:
        raise InputError(f"job {job.id}: its study is gone")
    written: list[ResultFile] = []
    for obj in objects:
        try:
            ds = obj.dataset if obj.dataset is not None else pydicom.dcmread(BytesIO(obj.data))
            uid = str(ds.StudyInstanceUID)
        except Exception as exc:  # anything pydicom raises on bytes that are not a DICOM file
            raise InputError(f"a result object is not a readable DICOM file: {type(exc).__name__}") from exc
        if uid != study.study_uid:
            raise InputError("a result object belongs to another study than its job's")
        rel = spool.result_relpath(uid, str(ds.SOPInstanceUID))
        spool.write(rel, obj.data, replace=True)
        written.append(result_file(ds, rel, obj.data, obj.variant))
    written_at = clock()
    if not catalog.record_results(job.id, written, job.destinations, written_at, state=state, error=reason,
                                  holder=holder):
        return None
    if timings is not None:
        catalog.record_job_timings(job.id, timings, clock())
    elif state != JobState.DONE:  # a not-assessed report: the job ends here (finished_at)
        catalog.finish_job(job.id, state, clock(), error=reason)
    # a rerun of this job: a delivery sent before now (all files written) may have carried the earlier file
    catalog.resend_replaced(job.id, [w.sop_instance_uid for w in written], written_at, clock())
    return written


def end_attempt(catalog: Catalog, job_id: int, outcome: Outcome, reason: str, policy: JobPolicy, now: float, *,
                holder: Holder | None = None) -> JobState | None:
    """End a failed attempt as ``outcome`` says; returns the job's new state, None if ``holder`` no
    longer holds the job (nothing changed)."""
    if outcome == "skip":
        return JobState.SKIPPED if catalog.finish_job(job_id, JobState.SKIPPED, now, error=reason,
                                                      holder=holder) else None
    if outcome == "fail":
        return JobState.FAILED if catalog.finish_job(job_id, JobState.FAILED, now, error=reason[:500],
                                                     holder=holder) else None
    return catalog.fail_attempt(job_id, now, reason, policy, holder=holder)
