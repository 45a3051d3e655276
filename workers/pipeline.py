"""One job, start to finish: claim -> load -> model -> encode -> results + deliveries in the catalog.

The job comes from a :class:`workers.source.JobSource`: the catalog and spool of this host, or the
node's worker API on a remote worker host (``remote:``, :mod:`workers.remote`). Testable without a
broker: ``run_job(context, job_id)``. Sending is not done here: the node's
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

from celery.exceptions import SoftTimeLimitExceeded
from pydicom.dataset import Dataset

from models import registry
from models.base import Model, ModelResult, Volume, is_pair_model
from models.errors import ConfigError, InputError, ModelError, TransientModelError, UnsuitableInput
from models.registry import ModelOptions
from node.catalog import Catalog
from node.catalog_ops import JobTimings
from node.config import Settings
from node.job_results import Outcome, ResultObject
from node.job_results import result_file as result_file  # where it lived; tests import it from here
from node.queue import model_time_limit
from node.schema import BINARY_VARIANT, JobState
from node.spool import Spool
from node.version import software_version
from workers.load import SeriesCache, load_series
from workers.outputs import encode_results
from workers.source import ClaimedJob, JobSource, LocalSource

log = logging.getLogger("workers.pipeline")

RunOutcome = JobState | Literal["not-claimed", "stale"]
"""What :func:`run_job` returns: the job's new state; ``not-claimed`` (not run here); ``stale`` (this
attempt lost the job to another worker while it ran: its outcome was dropped)."""


@dataclass
class WorkerContext:
    """What a worker process keeps between jobs: settings, where jobs come from (the catalog and spool,
    or the node's worker API with ``remote:``), warm models and the series loaded last."""

    settings: Settings
    catalog: Catalog | None = None
    spool: Spool | None = None
    clock: Callable[[], float] = time.time
    models: dict[str, Model] = field(default_factory=dict)
    job_source: JobSource | None = None
    """Where jobs come from; None: :class:`LocalSource` of ``catalog`` and ``spool``."""
    series: SeriesCache = field(default_factory=SeriesCache)
    """The series loaded last: the next jobs on the same files (the other models of the study) reuse it."""

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerContext:
        if settings.remote is not None:  # never opens the catalog nor reads the spool
            from workers.remote import NodeClient, RemoteSource

            return cls(settings, job_source=RemoteSource(settings, NodeClient(settings.remote)))
        return cls(settings, Catalog.for_settings(settings), Spool(settings.node.storage_dir))

    def source(self) -> JobSource:
        """Where this worker's jobs come from (built once)."""
        if self.job_source is None:
            if self.catalog is None or self.spool is None:
                raise ConfigError("a worker without remote: needs the catalog and the spool")
            self.job_source = LocalSource(self.settings, self.catalog, self.spool, self.clock)
        return self.job_source

    def model(self, name: str) -> Model:
        """The warm instance of model ``name``, built on first use with the site's ``models.<name>``
        settings (built lazily, in the worker child process: CUDA must not be initialised before a fork)."""
        if name not in self.models:
            s = self.settings.model_settings(name)
            options = ModelOptions(path=s.path, device=s.device, batch_size=s.batch_size, precision=s.precision)
            self.models[name] = registry.load(name, options)
        return self.models[name]


def run_job(ctx: WorkerContext, job_id: int) -> RunOutcome:
    """Run one job; returns its new state (``done``, ``skipped``, ``failed``, ``queued`` for a retry),
    ``not-claimed`` or ``stale``."""
    source = ctx.source()
    job = source.claim(job_id)
    if job is None:
        log.info("job #%d not claimed (finished, failed, or running elsewhere)", job_id)
        return "not-claimed"
    try:
        return _run(ctx, source, job)
    finally:
        source.release(job)


def _run(ctx: WorkerContext, source: JobSource, job: ClaimedJob) -> RunOutcome:
    t0 = time.monotonic()
    loaded: tuple[Model, Volume, list[Dataset]] | None = None
    try:
        model = ctx.model(job.model)
        volume, sources = ctx.series.load(source.series_key(job), lambda: source.inputs(job))
        loaded = (model, volume, sources)
        model.check(volume)
        prior_sources: list[Dataset] = []
        if is_pair_model(model):
            if volume.source_frames is not None and volume.modality != "CT":
                raise UnsuitableInput("registration onto a multi-frame series is supported for CT only (the "
                                      "registered prior is written as single-frame CT images on its geometry)")
            prior_paths = source.prior_inputs(job)
            if prior_paths is None:
                raise UnsuitableInput("no earlier study of this patient with this modality in the catalog "
                                      "(a prior whose retrieval from the PACS was cut short is not used)")
            prior_volume, prior_sources = load_series(prior_paths)
            model.check(prior_volume)
        t1 = time.monotonic()
        result = model.run_pair(volume, prior_volume) if is_pair_model(model) else model.run(volume)
        t2 = time.monotonic()
        predecessors = {}
        for variant in ("", BINARY_VARIANT):
            previous = source.predecessor(job, variant)
            if previous is not None:
                predecessors[variant] = previous
        encoded = encode_results(model, sources, volume, result, software_version=software_version(),
                                 predecessors=predecessors, prior_sources=prior_sources, leave_out=job.leave_out)
        objects = [ResultObject(_to_bytes(e.dataset), e.variant, e.dataset) for e in encoded]
        t3 = time.monotonic()
        version = result.model_version or model.manifest.version
        accepted = source.submit(job, objects, timings=JobTimings(t1 - t0, t2 - t1, t3 - t2, version))
    except Exception as exc:  # job_outcome() decides, by the exception's class, how the job ends
        if (isinstance(exc, UnsuitableInput) and loaded is not None and not is_pair_model(loaded[0])
                and _write_not_assessed(source, job, *loaded, reason=str(exc))):
            return JobState.SKIPPED
        return _end_attempt(ctx, source, job, exc)
    if not accepted:
        return _stale(job, "results")
    log.info(
        "job #%d study #%d model=%s done: %d object(s), %d slices; load %.1fs infer %.1fs encode %.1fs",
        job.id, job.study_id, job.model, len(objects), volume.voxels.shape[0], t1 - t0, t2 - t1, t3 - t2,
    )
    return JobState.DONE


def _stale(job: ClaimedJob, what: str) -> Literal["stale"]:
    log.warning("job #%d model=%s attempt %d: no longer this worker's (presumed lost, given to another); "
                "its %s are dropped", job.id, job.model, job.attempt, what)
    return "stale"


def _write_not_assessed(source: JobSource, job: ClaimedJob, model: Model, volume: Volume, sources: list[Dataset],
                        *, reason: str) -> bool:
    """Write and hand over the objects saying that ``model`` did not assess the series, and why, the job
    ending ``skipped``. True: the job's attempt is over (recorded, or no longer this worker's); False: no
    report was written (logged), the caller ends the job ``skipped``."""
    result = ModelResult(model.manifest.name, model.manifest.version, not_assessed=reason)
    try:
        previous = source.predecessor(job, "")
        predecessors = {"": previous} if previous is not None else {}
        encoded = encode_results(model, sources, volume, result, software_version=software_version(),
                                 predecessors=predecessors, leave_out=job.leave_out)
        if not encoded:
            return False
        objects = [ResultObject(_to_bytes(e.dataset), e.variant, e.dataset) for e in encoded]
        accepted = source.submit(job, objects, state=JobState.SKIPPED, reason=reason)
    except Exception:  # the job is skipped either way; the reason stays in the catalog
        log.exception("job #%d model=%s: could not write the not-assessed report", job.id, job.model)
        return False
    if not accepted:
        _stale(job, "not-assessed report")
        return True
    log.info("job #%d study #%d model=%s not assessed: %d object(s) say why", job.id, job.study_id, job.model,
             len(objects))
    return True


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


def _end_attempt(ctx: WorkerContext, source: JobSource, job: ClaimedJob, exc: Exception) -> RunOutcome:
    """Record a failed attempt as :func:`job_outcome` says; returns the job's new state."""
    outcome = job_outcome(exc)
    if outcome == "skip":
        reason = str(exc)
    elif isinstance(exc, SoftTimeLimitExceeded):  # the message's soft limit (node.queue.model_time_limit)
        reason = f"time limit of {model_time_limit(ctx.settings, job.model)} s exceeded"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    state = source.end_attempt(job, outcome, reason if outcome != "fail" else reason[:500])
    if state is None:
        return _stale(job, f"outcome ({type(exc).__name__})")
    if outcome == "skip":
        log.info("job #%d study #%d model=%s skipped: %s", job.id, job.study_id, job.model, exc)
        return state
    if outcome == "fail":
        what = "failed without retry: it would fail the same way (dicom-node retry once it is fixed)"
    else:
        what = ("will be retried" if state == JobState.QUEUED
                else "failed for good (dicom-node retry to try again)")
    log.error("job #%d study #%d model=%s attempt %d failed (%s); %s", job.id, job.study_id, job.model,
              job.attempt, type(exc).__name__, what)
    log.debug("job #%d traceback", job.id, exc_info=True)
    return state


def _to_bytes(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
