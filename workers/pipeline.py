"""One job, start to finish: load -> model -> encode -> results + deliveries in the catalog.

Testable without a broker: ``run_job(context, job_id)``. Sending is not done here: the node's
deliverer picks up the delivery rows this writes, so a PACS outage never fails a job.

A series the model declines (:class:`UnsuitableInput` from its ``check`` or ``run``, once the series
loaded) still gets results: an SR (and PDF) saying what was not assessed and why, sent like any
result, while the job ends ``skipped`` with the reason. Registration models are the exception (a
missing prior is not a property of the series, and the job is retried when one arrives).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Literal

import pydicom
from celery.exceptions import SoftTimeLimitExceeded
from pydicom.dataset import Dataset

from models import registry
from models.base import Model, ModelResult, Volume, is_pair_model
from models.errors import ConfigError, InputError, ModelError, TransientModelError, UnsuitableInput
from models.registry import ModelOptions
from node.catalog import Catalog, ResultFile
from node.catalog_ops import JobTimings
from node.config import Settings
from node.dicomweb.attributes import indexed_attributes
from node.policy import JobPolicy, job_policy, worker_identity
from node.queue import model_time_limit
from node.schema import BINARY_VARIANT, Job, JobState
from node.spool import Spool
from node.version import software_version
from workers.load import load_series
from workers.outputs import Encoded, encode_results

log = logging.getLogger("workers.pipeline")


@dataclass
class WorkerContext:
    """What a worker process keeps between jobs: settings, catalog, spool and warm models."""

    settings: Settings
    catalog: Catalog
    spool: Spool
    clock: Callable[[], float] = time.time
    models: dict[str, Model] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerContext:
        return cls(settings, Catalog.for_settings(settings), Spool(settings.node.storage_dir))

    def model(self, name: str) -> Model:
        """The warm instance of model ``name``, built on first use with the site's ``models.<name>``
        settings (built lazily, in the worker child process: CUDA must not be initialised before a fork)."""
        if name not in self.models:
            s = self.settings.model_settings(name)
            options = ModelOptions(path=s.path, device=s.device, batch_size=s.batch_size, precision=s.precision)
            self.models[name] = registry.load(name, options)
        return self.models[name]


def run_job(ctx: WorkerContext, job_id: int) -> JobState | Literal["not-claimed"]:
    """Run one job; returns its new state (``done``, ``skipped``, ``failed``, ``queued`` for a retry),
    or ``not-claimed``."""
    policy = job_policy(ctx.settings)
    job = ctx.catalog.claim_job(job_id, ctx.clock(), worker=worker_identity(), policy=policy)
    if job is None:
        log.info("job #%d not claimed (finished, failed, or running elsewhere)", job_id)
        return "not-claimed"
    t0 = time.monotonic()
    loaded: tuple[Model, Volume, list[Dataset]] | None = None
    try:
        model = ctx.model(job.model)
        paths = [ctx.spool.path(i.path) for i in ctx.catalog.instances_of_series(job.series_id)]
        volume, sources = load_series(paths)
        loaded = (model, volume, sources)
        model.check(volume)
        prior_sources: list[Dataset] = []
        if is_pair_model(model):
            if volume.source_frames is not None and volume.modality != "CT":
                raise UnsuitableInput("registration onto a multi-frame series is supported for CT only (the "
                                      "registered prior is written as single-frame CT images on its geometry)")
            prior = ctx.catalog.prior_series(job)
            if prior is None:
                raise UnsuitableInput("no earlier study of this patient with this modality in the catalog "
                                      "(a prior whose retrieval from the PACS was cut short is not used)")
            prior_volume, prior_sources = load_series(
                [ctx.spool.path(i.path) for i in ctx.catalog.instances_of_series(prior.id)])
            model.check(prior_volume)
        t1 = time.monotonic()
        result = model.run_pair(volume, prior_volume) if is_pair_model(model) else model.run(volume)
        t2 = time.monotonic()
        predecessors = {}
        for variant in ("", BINARY_VARIANT):
            previous = ctx.catalog.previous_result(job, "SR", variant)
            if previous is not None:
                predecessors[variant] = pydicom.dcmread(ctx.spool.path(previous.path))
        encoded = encode_results(model, sources, volume, result, software_version=software_version(),
                                 predecessors=predecessors, prior_sources=prior_sources)
        written = _store(ctx, str(sources[0].StudyInstanceUID), encoded)
        t3 = time.monotonic()
    except Exception as exc:  # job_outcome() decides, by the exception's class, how the job ends
        if isinstance(exc, UnsuitableInput) and loaded is not None and not is_pair_model(loaded[0]):
            _write_not_assessed(ctx, job, *loaded, reason=str(exc))
        return _end_attempt(ctx, job, exc, policy)
    written_at = ctx.clock()
    ctx.catalog.record_results(job_id, written, job.destinations, written_at)
    version = result.model_version or model.manifest.version
    ctx.catalog.record_job_timings(job_id, JobTimings(t1 - t0, t2 - t1, t3 - t2, version), ctx.clock())
    # a rerun of this job: a delivery sent before now (all files written) may have carried the earlier file
    ctx.catalog.resend_replaced(job_id, [w.sop_instance_uid for w in written], written_at, ctx.clock())
    log.info(
        "job #%d study #%d model=%s done: %d object(s), %d slices; load %.1fs infer %.1fs encode %.1fs",
        job_id, job.study_id, job.model, len(written), volume.voxels.shape[0], t1 - t0, t2 - t1, t3 - t2,
    )
    return JobState.DONE


def _write_not_assessed(ctx: WorkerContext, job: Job, model: Model, volume: Volume, sources: list[Dataset],
                        *, reason: str) -> None:
    """Write and record the objects saying that ``model`` did not assess the series, and why (the
    job is then ended ``skipped`` by the caller). A failure here is logged; the job is skipped anyway."""
    result = ModelResult(model.manifest.name, model.manifest.version, not_assessed=reason)
    try:
        previous = ctx.catalog.previous_result(job, "SR", "")
        predecessors = {"": pydicom.dcmread(ctx.spool.path(previous.path))} if previous is not None else {}
        encoded = encode_results(model, sources, volume, result, software_version=software_version(),
                                 predecessors=predecessors)
        written = _store(ctx, str(sources[0].StudyInstanceUID), encoded)
    except Exception:  # the job is skipped either way; the reason stays in the catalog
        log.exception("job #%d model=%s: could not write the not-assessed report", job.id, job.model)
        return
    if written:
        written_at = ctx.clock()
        ctx.catalog.record_results(job.id, written, job.destinations, written_at, state=JobState.SKIPPED,
                                   error=reason)
        ctx.catalog.resend_replaced(job.id, [w.sop_instance_uid for w in written], written_at, ctx.clock())
    log.info("job #%d study #%d model=%s not assessed: %d object(s) say why", job.id, job.study_id, job.model,
             len(written))


Outcome = Literal["skip", "fail", "retry"]


def job_outcome(exc: BaseException) -> Outcome:
    """How a job whose attempt raised ``exc`` ends (the exception tree: :mod:`models.errors`).

    ``skip``: the input cannot be analysed (InputError) -> ``skipped``, never retried.
    ``fail``: every attempt would fail the same way (ConfigError, or a ModelError that is not a
    TransientModelError: broken bundle, missing weights or extra) -> ``failed`` at once.
    ``retry``: anything else (TransientModelError, an OSError, a bug) -> queued again with backoff
    until ``queue.job_max_attempts``.
    """
    if isinstance(exc, InputError):
        return "skip"
    if isinstance(exc, TransientModelError):
        return "retry"
    if isinstance(exc, ConfigError | ModelError):
        return "fail"
    return "retry"


def _end_attempt(ctx: WorkerContext, job: Job, exc: Exception, policy: JobPolicy) -> JobState:
    """Record a failed attempt as :func:`job_outcome` says; returns the job's new state."""
    outcome = job_outcome(exc)
    now = ctx.clock()
    if outcome == "skip":
        ctx.catalog.finish_job(job.id, JobState.SKIPPED, now, error=str(exc))
        log.info("job #%d study #%d model=%s skipped: %s", job.id, job.study_id, job.model, exc)
        return JobState.SKIPPED
    if isinstance(exc, SoftTimeLimitExceeded):  # the message's soft limit (node.queue.model_time_limit)
        reason = f"time limit of {model_time_limit(ctx.settings, job.model)} s exceeded"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    if outcome == "fail":
        ctx.catalog.finish_job(job.id, JobState.FAILED, now, error=reason[:500])
        state = JobState.FAILED
        what = "failed without retry: it would fail the same way (dicom-node retry once it is fixed)"
    else:
        state = ctx.catalog.fail_attempt(job.id, now, reason, policy)
        what = ("will be retried" if state == JobState.QUEUED
                else "failed for good (dicom-node retry to try again)")
    log.error("job #%d study #%d model=%s attempt %d failed (%s); %s", job.id, job.study_id, job.model,
              job.attempts, type(exc).__name__, what)
    log.debug("job #%d traceback", job.id, exc_info=True)
    return state


def _store(ctx: WorkerContext, study_uid: str, encoded: list[Encoded]) -> list[ResultFile]:
    """Write each encoded object into the spool's results (replacing an earlier file of the same UID)."""
    written: list[ResultFile] = []
    for item in encoded:
        ds = item.dataset
        rel = ctx.spool.result_relpath(study_uid, str(ds.SOPInstanceUID))
        data = _to_bytes(ds)
        ctx.spool.write(rel, data, replace=True)
        written.append(result_file(ds, rel, data, item.variant))
    return written


def result_file(ds: Dataset, rel: str, data: bytes, variant: str = "") -> ResultFile:
    """The catalog's record of a result object written at spool path ``rel`` as ``data``: sent to the
    destinations, and served over DICOMweb as an instance of its own series in the study."""
    meta = pydicom.dcmread(BytesIO(data), stop_before_pixels=True).file_meta
    return ResultFile(str(ds.Modality), str(ds.SOPInstanceUID), str(ds.SOPClassUID), rel, variant,
                      series_uid=str(ds.SeriesInstanceUID), transfer_syntax_uid=str(meta.TransferSyntaxUID),
                      size=len(data), indexed=indexed_attributes(ds))


def _to_bytes(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
