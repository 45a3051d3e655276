"""Per-hop timings in the catalog, each written by the stage that finishes: ready (assembler), routed
(router), first enqueue (enqueuer), started/finished (claim, end), load/infer/encode seconds and the
model version (pipeline), a delivery's first attempt (deliverer); and a rerun's results sent again."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pydicom

from models.errors import DestinationUnreachable
from node.assemble import Assembler
from node.catalog import Catalog, JobSpec, ResultFile
from node.config import Rule, parse_settings
from node.enqueue import Enqueuer
from node.policy import JobPolicy
from node.receive.scp import STATUS_SUCCESS, Receiver
from node.route import Router
from node.schema import DeliveryState, JobState
from node.send.base import SendReport
from node.send.deliver import Deliverer
from node.spool import Spool
from testkit.dicom import write_ct_series
from testkit.phantom import make_ct_phantom
from workers.pipeline import WorkerContext, run_job


class FakeApp:
    def __init__(self) -> None:
        self.sent: list[int] = []

    def send_task(self, name: str, args: list[Any], queue: str) -> None:
        self.sent.append(args[0])


def test_assembler_router_enqueuer_and_job_ends_write_their_times(tmp_path: Path) -> None:
    catalog = Catalog.for_storage(tmp_path)
    now = [0.0]
    catalog.record_instance(study_uid="1.2", series_uid="1.2.3", sop_instance_uid="1.2.3.4",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                            path="x", size=1, series_attributes={"Modality": "CT"}, now=0.0)
    assembler = Assembler(catalog, 5.0, lambda: now[0])
    now[0] = 3.0
    assert assembler.tick() == []
    now[0] = 6.0
    assert assembler.tick() == [1]
    study = catalog.get_study(1)
    assert study is not None and study.ready_at == 6.0 and study.routed_at is None

    now[0] = 7.0
    rule = Rule(name="ct", match={"Modality": "CT"}, models=["ct-hu-segmentation"], send_to=[])
    [job_id] = Router(catalog, [rule], lambda: now[0]).route_ready()
    study = catalog.get_study(1)
    assert study is not None and study.routed_at == 7.0

    app = FakeApp()
    enqueuer = Enqueuer(app, catalog, lambda: now[0])
    now[0] = 8.0
    assert enqueuer.enqueue_pending() == 1
    catalog.forget_enqueued()  # a restart sends it again
    now[0] = 9.0
    assert enqueuer.enqueue_pending() == 1
    job = catalog.get_job(job_id)
    assert job is not None and (job.first_enqueued_at, job.enqueued_at) == (8.0, 9.0)

    policy = JobPolicy(max_attempts=2, retry_initial_seconds=0)
    assert catalog.claim_job(job_id, 10.0, worker="h:1", policy=policy) is not None
    assert catalog.fail_attempt(job_id, 11.0, "OSError", policy) == JobState.QUEUED
    now[0] = 12.0
    enqueuer.enqueue_pending()
    assert catalog.claim_job(job_id, 13.0, worker="h:1", policy=policy) is not None
    catalog.finish_job(job_id, JobState.SKIPPED, 14.0, error="too few slices")
    job = catalog.get_job(job_id)
    assert job is not None
    assert (job.first_enqueued_at, job.started_at, job.finished_at) == (8.0, 13.0, 14.0)
    assert catalog.retry_jobs(job_ids=[job_id]) == 1  # a new run: its times start again
    job = catalog.get_job(job_id)
    assert job is not None and (job.first_enqueued_at, job.started_at, job.finished_at) == (None, None, None)


def test_deliverer_records_the_first_attempt(tmp_path: Path) -> None:
    settings = parse_settings({
        "node": {"storage_dir": str(tmp_path)}, "send": {"retry_initial_seconds": 10},
        "destinations": [{"name": "pacs", "type": "dimse", "ae_title": "P", "host": "127.0.0.1", "port": 1}]})
    catalog = Catalog.for_storage(tmp_path)
    catalog.record_instance(study_uid="1.2", series_uid="1.2.3", sop_instance_uid="1.2.3.4",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                            path="x", size=1, series_attributes={}, now=0.0)
    catalog.mark_quiet_studies_ready(1.0)
    [series] = catalog.series_of_study(1)
    [job] = catalog.create_jobs(1, 1, [JobSpec(series.id, "m", "r", ("pacs",))], 0.0)
    catalog.record_results(job, [ResultFile("SEG", "1.9", "1.2.840.10008.5.1.4.1.1.66.4", "r/1.dcm")], ["pacs"], 0.0)
    calls = []

    class Flaky:
        def send(self, files: Sequence[Path], variants: Mapping[Path, str] | None = None) -> SendReport:
            calls.append(now[0])
            if len(calls) == 1:
                raise DestinationUnreachable("refused")
            return SendReport(sent=list(files))

    now = [20.0]
    d = Deliverer(settings, catalog, Spool(tmp_path), lambda: now[0], sender_factory=lambda _name: Flaky())
    assert d.tick() == 0
    now[0] = 40.0
    assert d.tick() == 1
    delivery = catalog.get_delivery(1)
    assert delivery is not None and (delivery.first_attempt_at, delivery.sent_at, delivery.attempts) == (20.0, 40.0, 2)


def test_pipeline_records_stage_times_and_a_rerun_is_sent_again(tmp_path: Path) -> None:
    settings = parse_settings({
        "node": {"storage_dir": str(tmp_path / "node"), "min_free_mb": 0},
        "destinations": [{"name": "pacs", "type": "dimse", "ae_title": "P", "host": "127.0.0.1", "port": 1}]})
    catalog, spool = Catalog.for_storage(settings.node.storage_dir), Spool(settings.node.storage_dir)
    receiver = Receiver(settings, catalog, spool, lambda: 0.0)
    files = write_ct_series(make_ct_phantom(n_slices=12, rows=64, cols=64, pixel_mm=5.0, seed=4), tmp_path / "ct")
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert receiver.store(f.read_bytes(), str(ds.SOPClassUID), str(ds.SOPInstanceUID), "CT1") == STATUS_SUCCESS
    [study_id] = catalog.mark_quiet_studies_ready(1.0, now=2.0)
    [series] = catalog.series_of_study(study_id)
    [job_id] = catalog.create_jobs(study_id, 1, [JobSpec(series.id, "ct-hu-segmentation", "r", ("pacs",))], 3.0)
    clock = [10.0]
    ctx = WorkerContext(settings, catalog, spool, clock=lambda: clock[0])

    assert run_job(ctx, job_id) == JobState.DONE
    job = catalog.get_job(job_id)
    assert job is not None and job.model_version == "1.2.0"
    assert job.load_seconds is not None and job.infer_seconds is not None and job.encode_seconds is not None
    assert min(job.load_seconds, job.infer_seconds, job.encode_seconds) > 0
    assert (job.started_at, job.finished_at) == (10.0, 10.0)
    due = catalog.due_deliveries(1e9)
    assert due and {d.state for d, _r, _s in due} == {DeliveryState.PENDING}
    for d, _r, _s in due:
        catalog.delivery_sent(d.id, 11.0)
    results_before = catalog.counts()["results"]

    clock[0] = 20.0
    assert catalog.rerun_study(study_id, 20.0) == [job_id]
    assert run_job(ctx, job_id) == JobState.DONE
    assert catalog.counts()["results"] == results_before  # same UIDs: the results are replaced, not added
    again = catalog.due_deliveries(1e9)
    assert len(again) == len(due) and all(d.attempts == 1 and d.sent_at == 11.0 for d, _r, _s in again)
    job = catalog.get_job(job_id)
    assert job is not None and (job.state, job.attempts, job.started_at) == (JobState.DONE, 1, 20.0)
