"""One job, start to finish: load -> model -> encode -> results + deliveries in the catalog.

Testable without a broker: ``run_job(context, job_id)``. Sending is not done here: the node's
deliverer picks up the delivery rows this writes, so a PACS outage never fails a job.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset

from models import registry
from models.base import Model, ModelError, UnsuitableInput, is_pair_model
from models.registry import ModelOptions
from node.catalog import Catalog, ResultFile, job_policy, worker_identity
from node.config import Settings
from node.send.base import BINARY_VARIANT
from node.spool import Spool
from workers.load import load_series
from workers.outputs import encode_results

log = logging.getLogger("workers.pipeline")


def software_version() -> str:
    try:
        return version("dicom-ai-node")
    except PackageNotFoundError:
        return "0+unknown"


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
        return cls(settings, Catalog.for_storage(settings.node.storage_dir), Spool(settings.node.storage_dir))

    def model(self, name: str) -> Model:
        """The warm instance of model ``name``, built on first use with the site's ``models.<name>``
        settings (built lazily, in the worker child process: CUDA must not be initialised before a fork)."""
        if name not in self.models:
            s = self.settings.model_settings(name)
            options = ModelOptions(path=s.path, device=s.device, batch_size=s.batch_size, precision=s.precision)
            self.models[name] = registry.load(name, options)
        return self.models[name]


def run_job(ctx: WorkerContext, job_id: int) -> str:
    """Run one job; returns its final state (``done``, ``skipped``, ``failed``, or ``not-claimed``)."""
    policy = job_policy(ctx.settings)
    job = ctx.catalog.claim_job(job_id, ctx.clock(), worker=worker_identity(), policy=policy)
    if job is None:
        log.info("job #%d not claimed (finished, failed, or running elsewhere)", job_id)
        return "not-claimed"
    t0 = time.monotonic()
    try:
        model = ctx.model(job.model)
        paths = [ctx.spool.path(i.path) for i in ctx.catalog.instances_of_series(job.series_id)]
        volume, sources = load_series(paths)
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
        study_uid = str(sources[0].StudyInstanceUID)
        written: list[ResultFile] = []
        for item in encoded:
            ds = item.dataset
            rel = ctx.spool.result_relpath(study_uid, str(ds.SOPInstanceUID))
            ctx.spool.write(rel, _to_bytes(ds), replace=True)
            written.append(ResultFile(str(ds.Modality), str(ds.SOPInstanceUID), str(ds.SOPClassUID), rel,
                                      item.variant))
        t3 = time.monotonic()
    except UnsuitableInput as exc:
        ctx.catalog.finish_job(job_id, "skipped", ctx.clock(), error=str(exc))
        log.info("job #%d study #%d model=%s skipped: %s", job_id, job.study_id, job.model, exc)
        return "skipped"
    except (ModelError, Exception) as exc:
        state = ctx.catalog.fail_attempt(job_id, ctx.clock(), f"{type(exc).__name__}: {exc}", policy)
        what = "will be retried" if state == "queued" else "failed for good (dicom-node retry to try again)"
        log.error("job #%d study #%d model=%s attempt %d failed (%s); %s", job_id, job.study_id, job.model,
                  job.attempts, type(exc).__name__, what)
        log.debug("job #%d traceback", job_id, exc_info=True)
        return state
    ctx.catalog.record_results(job_id, written, json.loads(job.destinations), ctx.clock())
    log.info(
        "job #%d study #%d model=%s done: %d object(s), %d slices; load %.1fs infer %.1fs encode %.1fs",
        job_id, job.study_id, job.model, len(written), volume.voxels.shape[0], t1 - t0, t2 - t1, t3 - t2,
    )
    return "done"


def _to_bytes(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
