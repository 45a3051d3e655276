"""workers.pipeline: how a job ends is decided by the exception's class, in one place (job_outcome)."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.base import Model
from models.errors import (
    BundleError,
    ConfigError,
    DestinationUnreachable,
    InputError,
    ManifestError,
    MissingExtraError,
    ModelError,
    ModelOptionsError,
    PermanentModelError,
    TransientModelError,
    UnknownModelError,
    UnreadableInput,
    UnsuitableInput,
)
from node.catalog import Catalog, JobSpec
from node.config import parse_settings
from node.schema import JobState
from node.spool import Spool
from workers.pipeline import WorkerContext, job_outcome, run_job


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (UnsuitableInput("too few slices"), "skip"),
        (UnreadableInput("malformed Pixel Spacing"), "skip"),
        (InputError("input"), "skip"),
        (BundleError("/opt/b/models/model.pt: cannot read"), "fail"),
        (ManifestError("manifest.yaml: bad"), "fail"),
        (MissingExtraError("needs the optional extra 'ml'"), "fail"),
        (PermanentModelError("no weights"), "fail"),
        (ModelError("a model error without a kind"), "fail"),
        (ModelOptionsError("models.x.path does not exist"), "fail"),
        (UnknownModelError("unknown model 'x'"), "fail"),
        (TransientModelError("CUDA out of memory"), "retry"),
        (RuntimeError("a bug"), "retry"),
        (OSError("disk hiccup"), "retry"),
        (DestinationUnreachable("not a job error: retried like any unexpected one"), "retry"),
    ],
)
def test_job_outcome_by_class(exc: Exception, outcome: str) -> None:
    assert job_outcome(exc) == outcome


def test_tree_has_one_root() -> None:
    from models import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert all(issubclass(c, errors.DicomNodeError) for c in classes)
    assert issubclass(MissingExtraError, ConfigError) and issubclass(MissingExtraError, PermanentModelError)


class _Context(WorkerContext):
    """A worker context whose model fails to build with a given exception."""

    error: Exception = RuntimeError()

    def model(self, name: str) -> Model:
        raise self.error


@pytest.mark.parametrize(
    ("error", "state", "attempts_used"),
    [
        (BundleError("/opt/bundle/models/model.pt: truncated"), JobState.FAILED, 1),
        (MissingExtraError("models.ct-registration: needs the optional extra 'ml'"), JobState.FAILED, 1),
        (UnsuitableInput("needs at least 3 slices"), JobState.SKIPPED, 1),
        (TransientModelError("CUDA out of memory"), JobState.FAILED, 3),
        (RuntimeError("a bug"), JobState.FAILED, 3),
    ],
)
def test_run_job_retries_only_what_may_pass(tmp_path: Path, error: Exception, state: JobState,
                                            attempts_used: int) -> None:
    settings = parse_settings({"node": {"storage_dir": str(tmp_path)},
                               "queue": {"job_max_attempts": 3, "job_retry_initial_seconds": 0}})
    catalog = Catalog.for_storage(tmp_path)
    catalog.record_instance(study_uid="1.2", series_uid="1.2.3", sop_instance_uid="1.2.3.4",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                            path="x", size=1, series_attributes={"Modality": "CT"}, now=0.0)
    catalog.mark_quiet_studies_ready(1.0)
    [series] = catalog.series_of_study(1)
    [job_id] = catalog.create_jobs(1, 1, [JobSpec(series.id, "ct-hu-segmentation", "r", ())], 0.0)
    ctx = _Context(settings, catalog, Spool(tmp_path), clock=lambda: 10.0)
    ctx.error = error
    runs = 0
    while (result := run_job(ctx, job_id)) == JobState.QUEUED:  # a retry: the next message runs it again
        runs += 1
        assert runs < 5
    job = catalog.get_job(job_id)
    assert job is not None and (result, job.state, job.attempts) == (state, state, attempts_used)
    assert job.error is not None and str(error) in job.error
