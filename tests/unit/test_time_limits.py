"""Per-model time limits: sent with each message, leases cover them, a soft limit ends the attempt
with "time limit of N s exceeded" (retried per queue.job_max_attempts). The real worker enforcing
them: tests/integration/test_priorities_redis.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from models.base import Model
from models.errors import ConfigError
from node.catalog import Catalog, JobSpec
from node.config import parse_settings
from node.enqueue import Dispatch, Enqueuer
from node.policy import JOB_LEASE_MARGIN_SECONDS, job_policy
from node.queue import HARD_LIMIT_GRACE_SECONDS, create_app, longest_time_limit, model_time_limit
from node.schema import JobState
from node.spool import Spool
from workers.pipeline import WorkerContext, run_job


def _settings(tmp_path: Path, **queue: Any) -> Any:
    return parse_settings({"node": {"storage_dir": str(tmp_path)}, "queue": {"job_time_limit_seconds": 600, **queue},
                           "models": {"ct-hu-segmentation": {"time_limit_seconds": 5},
                                      "ct-lung-nodules": {"time_limit_seconds": 7200}}})


def test_limits_per_model_and_what_must_outlast_them(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert model_time_limit(settings, "ct-hu-segmentation") == 5
    assert model_time_limit(settings, "ct-emphysema") == 600  # no entry: the queue's limit
    assert longest_time_limit(settings) == 7200
    assert job_policy(settings).lease_seconds == 7200 + JOB_LEASE_MARGIN_SECONDS  # a long job keeps its lease
    app = create_app(settings)
    assert app.conf.task_soft_time_limit == 600
    assert app.conf.task_time_limit == 600 + HARD_LIMIT_GRACE_SECONDS
    with pytest.raises(ConfigError):
        parse_settings({"models": {"ct-hu-segmentation": {"time_limit_seconds": 0}}})


def _job(catalog: Catalog, model: str) -> int:
    catalog.record_instance(study_uid="1.2", series_uid="1.2.3", sop_instance_uid="1.2.3.4",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                            path="x", size=1, series_attributes={"Modality": "CT"}, now=0.0)
    catalog.mark_quiet_studies_ready(1.0)
    [series] = catalog.series_of_study(1)
    [job_id] = catalog.create_jobs(1, 1, [JobSpec(series.id, model, "r", ())], 0.0)
    return job_id


def test_each_message_carries_its_models_limit(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    catalog = Catalog.for_storage(tmp_path)
    job_id = _job(catalog, "ct-hu-segmentation")
    sent: list[dict[str, Any]] = []

    class App:
        def send_task(self, name: str, args: list[Any], queue: str, **options: Any) -> None:
            sent.append(options)

    enq = Enqueuer(App(), catalog, lambda: 5.0, dispatch=Dispatch.from_settings(settings))
    assert enq.enqueue_pending() == 1
    assert sent == [{"soft_time_limit": 5, "time_limit": 5 + HARD_LIMIT_GRACE_SECONDS}]
    job = catalog.get_job(job_id)
    assert job is not None and job.enqueued_at == 5.0


class _SlowContext(WorkerContext):
    """The model is interrupted by the worker's soft time limit (Celery raises it in the job)."""

    def model(self, name: str) -> Model:
        raise SoftTimeLimitExceeded()


@pytest.mark.parametrize(("attempts", "state"), [(1, JobState.FAILED), (2, JobState.QUEUED)])
def test_soft_limit_ends_the_attempt_with_a_clear_error(tmp_path: Path, attempts: int, state: JobState) -> None:
    settings = _settings(tmp_path, job_max_attempts=attempts)
    catalog = Catalog.for_storage(tmp_path)
    job_id = _job(catalog, "ct-hu-segmentation")
    assert run_job(_SlowContext(settings, catalog, Spool(tmp_path), clock=lambda: 10.0), job_id) == state
    job = catalog.get_job(job_id)
    assert job is not None and job.state == state and job.error == "time limit of 5 s exceeded"
