"""Fencing and heartbeat leases in the catalog (SQLite and PostgreSQL): only the attempt that holds a job records its
outcome (the direct path's worker drops a stale one), and a job whose worker's heartbeat went quiet goes
back to the queue, on any host."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.base import Model
from models.errors import ConfigError
from node.catalog import Catalog, JobSpec, ResultFile
from node.config import parse_settings
from node.policy import Holder, JobPolicy
from node.schema import JobState
from node.spool import Spool
from node.worker_beats import Beat, remove_beat, write_beat
from workers.pipeline import WorkerContext, run_job

POLICY = JobPolicy(max_attempts=3, retry_initial_seconds=0, lease_seconds=3600, local_host="node-host",
                   worker_lost_seconds=30)
SEG = ResultFile("SEG", "1.2.3.4.9", "1.2.840.10008.5.1.4.1.1.66.4", "results/1.2/1.2.3.4.9.dcm")



def _job(catalog: Catalog) -> int:
    catalog.record_instance(study_uid="1.2", series_uid="1.2.3", sop_instance_uid="1.2.3.4",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                            path="x", size=1, series_attributes={"Modality": "CT"}, now=0.0)
    [study_id] = catalog.mark_quiet_studies_ready(1.0)
    [series] = catalog.series_of_study(study_id)
    [job_id] = catalog.create_jobs(study_id, 1, [JobSpec(series.id, "ct-hu-segmentation", "r", ("pacs",))], 0.0)
    return job_id


def _beat(catalog: Catalog, worker: str, now: float) -> None:
    host, _, pid = worker.rpartition(":")
    write_beat(catalog, Beat(host, int(pid), "cpu", 90.0), now)


def test_a_stale_attempt_changes_nothing(catalog: Catalog) -> None:
    job_id = _job(catalog)
    first = catalog.claim_job(job_id, 100.0, worker="remote-a:11", policy=POLICY)
    assert first is not None and first.attempts == 1
    _beat(catalog, "remote-a:11", 100.0)  # then remote-a goes quiet
    assert catalog.requeue_abandoned(131.0, POLICY) == [job_id]
    second = catalog.claim_job(job_id, 132.0, worker="remote-b:22", policy=POLICY)
    assert second is not None and second.attempts == 2
    old, new = Holder(1, "remote-a:11"), Holder(2, "remote-b:22")
    assert catalog.record_results(job_id, [SEG], ["pacs"], 140.0, holder=old) is False
    assert catalog.finish_job(job_id, JobState.FAILED, 140.0, error="late", holder=old) is False
    assert catalog.fail_attempt(job_id, 140.0, "late", POLICY, holder=old) is None
    assert catalog.fail_attempt(job_id, 140.0, "late", POLICY, holder=Holder(2, "remote-a:11")) is None
    job = catalog.get_job(job_id)
    assert job is not None and (job.state, job.attempts, job.worker) == (JobState.RUNNING, 2, "remote-b:22")
    assert catalog.counts()["results"] == {"total": 0} and catalog.counts()["deliveries"] == {}

    assert catalog.record_results(job_id, [SEG], ["pacs"], 150.0, holder=new) is True
    assert catalog.record_results(job_id, [SEG], ["pacs"], 151.0, holder=new) is False  # done: no holder now
    job = catalog.get_job(job_id)
    assert job is not None and job.state == JobState.DONE
    assert catalog.counts()["results"] == {"total": 1} and catalog.counts()["deliveries"] == {"pending": 1}


def test_the_holder_fails_its_attempt(catalog: Catalog) -> None:
    job_id = _job(catalog)
    assert catalog.claim_job(job_id, 100.0, worker="remote-a:11", policy=POLICY) is not None
    assert catalog.fail_attempt(job_id, 101.0, "boom", POLICY, holder=Holder(1, "remote-a:11")) == JobState.QUEUED
    assert catalog.claim_job(job_id, 102.0, worker="remote-a:11", policy=POLICY) is not None
    assert catalog.finish_job(job_id, JobState.SKIPPED, 103.0, error="no", holder=Holder(2, "remote-a:11")) is True
    job = catalog.get_job(job_id)
    assert job is not None and (job.state, job.error, job.finished_at) == (JobState.SKIPPED, "no", 103.0)


def test_a_quiet_heartbeat_loses_the_job_a_live_one_keeps_it(catalog: Catalog) -> None:
    job_id = _job(catalog)
    assert catalog.claim_job(job_id, 100.0, worker="gpu-7:4242", policy=POLICY) is not None
    for t in (100.0, 105.0, 110.0, 115.0, 120.0, 125.0):
        _beat(catalog, "gpu-7:4242", t)
        assert catalog.requeue_abandoned(t + 4.0, POLICY) == []  # beating: kept, however long it runs
    assert catalog.claim_job(job_id, 150.0, worker="gpu-8:1", policy=POLICY) is None  # 25 s quiet: not yet
    assert catalog.requeue_abandoned(155.0, POLICY) == []  # exactly 30 s quiet: not yet
    assert catalog.requeue_abandoned(155.5, POLICY) == [job_id]
    job = catalog.get_job(job_id)
    assert job is not None and (job.state, job.error, job.enqueued_at) == (JobState.QUEUED, "worker lost", None)


def test_a_lost_worker_job_is_claimed_directly_by_another(catalog: Catalog) -> None:
    job_id = _job(catalog)
    assert catalog.claim_job(job_id, 100.0, worker="gpu-7:4242", policy=POLICY) is not None
    _beat(catalog, "gpu-7:4242", 101.0)
    job = catalog.claim_job(job_id, 140.0, worker="gpu-8:1", policy=POLICY)
    assert job is not None and (job.attempts, job.worker, job.error) == (2, "gpu-8:1", "worker lost")


def test_a_fresh_claim_is_not_lost_for_an_old_row(catalog: Catalog) -> None:
    """A worker's row last written long ago (say before a pause) does not make a job it just claimed lost."""
    job_id = _job(catalog)
    _beat(catalog, "gpu-7:4242", 10.0)
    assert catalog.claim_job(job_id, 100.0, worker="gpu-7:4242", policy=POLICY) is not None
    assert catalog.requeue_abandoned(120.0, POLICY) == []
    assert catalog.requeue_abandoned(131.0, POLICY) == [job_id]


def test_without_a_heartbeat_row_only_the_lease_decides(catalog: Catalog) -> None:
    """A clean stop removes the row; a worker elsewhere that never wrote one keeps its job until the lease."""
    job_id = _job(catalog)
    assert catalog.claim_job(job_id, 100.0, worker="remote-a:11", policy=POLICY) is not None
    _beat(catalog, "remote-a:11", 100.0)
    remove_beat(catalog, "remote-a", 11)
    assert catalog.requeue_abandoned(1000.0, POLICY) == []
    assert catalog.requeue_abandoned(100.0 + 3600.5, POLICY) == [job_id]


def test_a_dead_local_pid_is_lost_at_once(catalog: Catalog) -> None:
    job_id = _job(catalog)
    assert catalog.claim_job(job_id, 100.0, worker="node-host:999999999", policy=POLICY) is not None
    assert catalog.requeue_abandoned(100.5, POLICY) == [job_id]
    _job_on(catalog, "elsewhere:999999999")
    assert catalog.requeue_abandoned(100.5, POLICY) == []  # another host's pid says nothing here


def _job_on(catalog: Catalog, worker: str) -> None:
    catalog.record_instance(study_uid="1.3", series_uid="1.3.3", sop_instance_uid="1.3.3.4",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                            path="y", size=1, series_attributes={"Modality": "CT"}, now=0.0)
    [study_id] = catalog.mark_quiet_studies_ready(1.0)
    [series] = catalog.series_of_study(study_id)
    [job_id] = catalog.create_jobs(study_id, 1, [JobSpec(series.id, "ct-hu-segmentation", "r", ())], 0.0)
    assert catalog.claim_job(job_id, 100.0, worker=worker, policy=POLICY) is not None


class _Overtaken(WorkerContext):
    """While the model loads, this worker is presumed lost and another one claims the job."""

    def model(self, name: str) -> Model:
        assert self.catalog is not None
        job = self.catalog.get_job(1)
        assert job is not None and job.worker is not None
        _beat(self.catalog, job.worker, 10.0)
        assert self.catalog.claim_job(1, 100.0, worker="elsewhere:5", policy=POLICY) is not None
        raise RuntimeError("a bug")


def test_the_direct_path_drops_a_stale_outcome(tmp_path: Path, catalog: Catalog) -> None:
    settings = parse_settings({"node": {"storage_dir": str(tmp_path)}, "queue": {"job_retry_initial_seconds": 0}})
    job_id = _job(catalog)
    assert run_job(_Overtaken(settings, catalog, Spool(tmp_path), clock=lambda: 10.0), job_id) == "stale"
    job = catalog.get_job(job_id)
    assert job is not None and (job.state, job.attempts, job.worker, job.error) == (
        JobState.RUNNING, 2, "elsewhere:5", "worker lost")


def test_remote_workers_need_a_broker(tmp_path: Path) -> None:
    remote = {"node_url": "https://ai-node.example:8080", "token_file": str(tmp_path / "token")}
    with pytest.raises(ConfigError, match=r"remote workers need queue\.broker_url"):
        parse_settings({"node": {"storage_dir": str(tmp_path)}, "remote": remote})
    s = parse_settings({"node": {"storage_dir": str(tmp_path)}, "remote": remote,
                        "queue": {"broker_url": "redis://10.0.0.5:6379/0"}})
    assert s.remote is not None and s.remote.name is None and s.queue.worker_lost_seconds == 30
    with pytest.raises(ConfigError, match="worker_lost_seconds"):
        parse_settings({"node": {"storage_dir": str(tmp_path)}, "queue": {"worker_lost_seconds": 5}})
