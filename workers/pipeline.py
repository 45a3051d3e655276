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
from models.base import Model, ModelError, ModelResult, UnsuitableInput, Volume, is_pair_model
from node.catalog import Catalog, job_policy, worker_identity
from node.config import Settings
from node.spool import Spool
from workers.encode.measure import measure_segments
from workers.encode.registered import build_registered_prior
from workers.encode.seg import EmptyResultError, build_seg
from workers.encode.sr import build_sr
from workers.load import load_series

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
        if name not in self.models:
            self.models[name] = registry.load(name)
        return self.models[name]


def encode_results(
    model: Model, sources: list[Dataset], volume: Volume, result: ModelResult, predecessor: Dataset | None = None
) -> list[Dataset]:
    """The DICOM objects the model's manifest promises, for this result ([] when it found nothing).

    ``predecessor`` is the SR of an earlier run on this series that the new SR supersedes.
    """
    objects = model.manifest.objects
    out: list[Dataset] = []
    sw = software_version()
    seg: Dataset | None = None
    if "SEG" in objects and any(s.mask.any() for s in result.segments):
        seg = build_seg(sources, result, software_version=sw)
        out.append(seg)
    if "SR" in objects or ("REG" in objects and result.registration is not None):
        measurements = measure_segments(volume, result.segments) if seg is not None else ()
        try:
            out.append(build_sr(sources, result, seg=seg, measurements=measurements, software_version=sw,
                                predecessor=predecessor))
        except EmptyResultError:
            log.info("model %s found nothing to report; no SR written", model.manifest.name)
    return out


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
            prior = ctx.catalog.prior_series(job)
            if prior is None:
                raise UnsuitableInput("no earlier study of this patient with this modality in the catalog")
            prior_volume, prior_sources = load_series(
                [ctx.spool.path(i.path) for i in ctx.catalog.instances_of_series(prior.id)])
            model.check(prior_volume)
        t1 = time.monotonic()
        result = model.run_pair(volume, prior_volume) if is_pair_model(model) else model.run(volume)
        t2 = time.monotonic()
        previous = ctx.catalog.previous_result(job, "SR")
        predecessor = pydicom.dcmread(ctx.spool.path(previous.path)) if previous is not None else None
        datasets = encode_results(model, sources, volume, result, predecessor)
        if "REG" in model.manifest.objects and result.registration is not None:
            datasets += build_registered_prior(sources, prior_sources, result, software_version=software_version())
        study_uid = str(sources[0].StudyInstanceUID)
        written: list[tuple[str, str, str, str]] = []
        for ds in datasets:
            rel = ctx.spool.result_relpath(study_uid, str(ds.SOPInstanceUID))
            ctx.spool.write(rel, _to_bytes(ds), replace=True)
            written.append((str(ds.Modality), str(ds.SOPInstanceUID), str(ds.SOPClassUID), rel))
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
