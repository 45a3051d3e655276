"""Event detection on a real SQLite catalog with an injected clock: each event is found from the facts
the node's loops write, announced once, and carries no patient data."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from models.errors import DestinationUnreachable
from node.catalog import Catalog, JobSpec
from node.config import Settings
from node.notify import Notifier
from node.policy import JobPolicy
from node.schema import JobState, StudyState, WorkerHeartbeat
from node.send.base import SendReport
from node.send.deliver import Deliverer
from node.spool import Spool

STUDY_UID = "1.2.826.0.1.3680043.8.498.424242"
PATIENT_ID = "PAT-SECRET-77"
POLICY = JobPolicy(max_attempts=2, lease_seconds=100)


class Recorder:
    """A notification sender that keeps what it was given (the transport seam)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, dict[str, Any]]] = []

    def send(self, event: str, outbox_id: int, doc: dict[str, Any]) -> None:
        self.sent.append((event, outbox_id, doc))

    def events(self) -> list[str]:
        return [e for e, _, _ in self.sent]


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_settings(tmp_path: Path, **notifications: Any) -> Settings:
    target: dict[str, Any] = {"name": "hook", "type": "webhook", "url": "http://127.0.0.1:9/x"}
    target.update(notifications.pop("target", {}))
    return Settings.model_validate({
        "node": {"storage_dir": str(tmp_path), "ae_title": "AI-NODE"},
        "send": {"retry_initial_seconds": 10, "retry_max_seconds": 40},
        "destinations": [{"name": "pacs", "type": "dimse", "ae_title": "P", "host": "127.0.0.1", "port": 1}],
        "storage": {"high_watermark_percent": 90, "low_watermark_percent": 80},
        "notifications": {"targets": [target], "dashboard_url": "https://node.example:8080", **notifications},
    })


def add_job(catalog: Catalog, now: float, model: str = "ct-lung", n: int = 1) -> int:
    """A study (with a Patient ID that must never leave) routed to one job of ``model``."""
    catalog.record_instance(study_uid=f"{STUDY_UID}.{n}", series_uid=f"{STUDY_UID}.{n}.1",
                            sop_instance_uid=f"{STUDY_UID}.{n}.1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                            transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"x{n}", size=1, series_attributes={},
                            now=now, patient_key=PATIENT_ID)
    catalog.mark_quiet_studies_ready(now)
    [study] = [s for s in catalog.studies_in_state(StudyState.READY) if s.study_uid == f"{STUDY_UID}.{n}"]
    [series] = catalog.series_of_study(study.id)
    [job] = catalog.create_jobs(study.id, study.generation, [JobSpec(series.id, model, "rule-1", ("pacs",))], now)
    return job


def setup(tmp_path: Path, clock: Clock, usage: Any = None, **notifications: Any) -> tuple[Notifier, Catalog, Recorder]:
    settings = make_settings(tmp_path, **notifications)
    catalog = Catalog.for_storage(tmp_path)
    rec = Recorder()
    notifier = Notifier(settings, catalog, clock, usage=usage or (lambda: (100, 10, 90, 10.0)),
                        senders={"hook": rec})
    return notifier, catalog, rec


def no_patient_data(doc: dict[str, Any]) -> None:
    text = json.dumps(doc)
    assert STUDY_UID not in text and PATIENT_ID not in text


def test_job_failed_for_good_is_announced_once_with_minimal_payload(tmp_path: Path) -> None:
    clock = Clock()
    notifier, catalog, rec = setup(tmp_path, clock)
    notifier.tick()  # first run: the scan starts here
    job = add_job(catalog, clock.t)
    catalog.claim_job(job, clock.t, worker="h:1", policy=POLICY)
    assert catalog.fail_attempt(job, clock.t, "OSError: disk gone", POLICY) == "queued"  # not for good yet
    clock.t += 5
    assert notifier.tick() == 0
    catalog.claim_job(job, clock.t, worker="h:1", policy=POLICY)
    assert catalog.fail_attempt(job, clock.t, "OSError: disk gone", POLICY) == "failed"
    clock.t += 5
    assert notifier.tick() == 1
    assert notifier.tick() == 0  # announced once
    [(event, _, doc)] = rec.sent
    assert event == "job-failed" and doc["event"] == "job-failed"
    assert doc["job"] == {"id": job, "model": "ct-lung", "rule": "rule-1", "attempts": 2, "error": "OSError: disk gone",
                          "worker": "h:1", "finished_at": doc["job"]["finished_at"]}
    assert doc["study"] == {"id": 1, "path": "/studies/1", "url": "https://node.example:8080/studies/1"}
    assert doc["node"]["ae_title"] == "AI-NODE" and doc["summary"] == "job failed: ct-lung on study #1"
    assert doc["key"].startswith(f"job-failed:{job}:")
    no_patient_data(doc)
    # retried by the operator and failed again: a new fact
    catalog.retry_jobs(job_ids=[job])
    clock.t += 5
    catalog.claim_job(job, clock.t, worker="h:2", policy=POLICY)
    catalog.finish_job(job, JobState.FAILED, clock.t, error="ModelError: broken bundle")
    clock.t += 5
    assert notifier.tick() == 1
    assert rec.events() == ["job-failed", "job-failed"]


def test_facts_from_before_the_first_run_are_not_announced(tmp_path: Path) -> None:
    clock = Clock()
    notifier, catalog, rec = setup(tmp_path, clock)
    job = add_job(catalog, clock.t)
    catalog.finish_job(job, JobState.FAILED, clock.t, error="old")
    clock.t += 3600  # the notifier is configured an hour later
    assert notifier.tick() == 0 and rec.sent == []


def test_worker_lost_through_the_requeue_hook_and_through_the_scan(tmp_path: Path) -> None:
    clock = Clock()
    notifier, catalog, rec = setup(tmp_path, clock)
    notifier.detect_tick()
    a, b = add_job(catalog, clock.t, n=1), add_job(catalog, clock.t, n=2)
    catalog.claim_job(a, clock.t, worker="gone:1", policy=POLICY)
    catalog.claim_job(b, clock.t, worker="gone:2", policy=POLICY)
    clock.t += 200  # both leases expired
    lost = catalog.requeue_abandoned(clock.t, JobPolicy(max_attempts=2, lease_seconds=100, local_host="x"))
    assert sorted(lost) == [a, b]
    notifier.jobs_lost([a])  # the pipeline loop's hook: recorded at once
    catalog.claim_job(a, clock.t, worker="h:3", policy=POLICY)  # running again before the next scan
    notifier.detect_tick()  # finds b (queued, "worker lost"); a is known
    notifier.send_tick()
    keys = sorted(doc["key"] for _, _, doc in rec.sent)
    assert keys == [f"worker-lost:{a}:1", f"worker-lost:{b}:1"]
    assert sorted(doc["job"]["worker"] for _, _, doc in rec.sent) == ["gone:1", "gone:2"]  # the lost workers
    assert rec.sent[0][2]["summary"] == "worker lost: ct-lung on study #1 (attempt 1)"
    clock.t += 5
    assert notifier.tick() == 0  # a (running, attempt 2 after the lost attempt 1) is not announced again


def test_worker_lost_when_its_heartbeat_stops(tmp_path: Path) -> None:
    clock = Clock()
    notifier, catalog, rec = setup(tmp_path, clock)
    notifier.detect_tick()
    lost_after = notifier.detector.settings.queue.worker_lost_seconds
    with catalog.session() as s:  # what workers.heartbeat writes: one alive, one that stopped beating
        s.add(WorkerHeartbeat(host="gpu-1", pid=11, queues="gpu", started_at=clock.t - 100, last_seen_at=clock.t,
                              job_id=None))
        s.add(WorkerHeartbeat(host="gpu-2", pid=12, queues="gpu", started_at=clock.t - 100, last_seen_at=clock.t,
                              job_id=None))
    clock.t += lost_after - 1
    with catalog.session() as s:
        s.execute(update(WorkerHeartbeat).where(WorkerHeartbeat.host == "gpu-1").values(last_seen_at=clock.t))
    assert notifier.tick() == 0
    clock.t += 2
    assert notifier.tick() == 1
    assert notifier.tick() == 0
    [(event, _, doc)] = rec.sent
    assert event == "worker-lost" and doc["worker"]["host"] == "gpu-2" and doc["worker"]["pid"] == 12
    assert doc["summary"] == f"worker lost: gpu-2:12 (no heartbeat for {round(lost_after + 1)} s)"


def test_results_only_for_the_models_a_target_lists(tmp_path: Path) -> None:
    clock = Clock()
    notifier, catalog, rec = setup(tmp_path, clock, target={"events": ["results"], "models": ["ct-lung"]})
    notifier.detect_tick()
    wanted, other = add_job(catalog, clock.t, "ct-lung", n=1), add_job(catalog, clock.t, "brain", n=2)
    for job in (wanted, other):
        catalog.claim_job(job, clock.t, worker="h:1", policy=POLICY)
        catalog.record_results(job, [("SEG", f"2.25.{job}1", "1.2.840.10008.5.1.4.1.1.66.4", f"r/{job}a"),
                                     ("SR", f"2.25.{job}2", "1.2.840.10008.5.1.4.1.1.88.34", f"r/{job}b")],
                               ["pacs"], clock.t)
    clock.t += 1
    assert notifier.tick() == 1
    [(event, _, doc)] = rec.sent
    assert event == "results" and doc["job"]["id"] == wanted and doc["results"] == {"SEG": 1, "SR": 1}
    assert doc["job"]["destinations"] == ["pacs"]
    no_patient_data(doc)


def _failing_deliverer(tmp_path: Path, notifier: Notifier, catalog: Catalog, clock: Clock,
                       working: list[bool]) -> Deliverer:
    class Sender:
        def send(self, files: Sequence[Path], variants: Mapping[Path, str] | None = None) -> SendReport:
            if not working[0]:
                raise DestinationUnreachable("association rejected")
            return SendReport(sent=list(files))

    return Deliverer(notifier.settings, catalog, Spool(tmp_path), clock, lambda name: Sender(),
                     on_batch=notifier.delivery_batch)


def _job_with_results(catalog: Catalog, clock: Clock, n: int = 1) -> int:
    job = add_job(catalog, clock.t, n=n)
    catalog.claim_job(job, clock.t, worker="h:1", policy=POLICY)
    catalog.record_results(job, [("SEG", f"2.25.9{n}", "1.2.840.10008.5.1.4.1.1.66.4", f"r/{n}")], ["pacs"], clock.t)
    return job


def test_delivery_late_after_the_configured_minutes(tmp_path: Path) -> None:
    clock = Clock()
    notifier, catalog, rec = setup(tmp_path, clock, target={"events": ["delivery-late"]}, delivery_late_minutes=30)
    working = [False]
    deliverer = _failing_deliverer(tmp_path, notifier, catalog, clock, working)
    notifier.tick()
    _job_with_results(catalog, clock)
    deliverer.tick()  # first attempt fails at t0
    clock.t += 29 * 60
    deliverer.tick()
    assert notifier.tick() == 0
    clock.t += 2 * 60
    assert notifier.tick() == 1
    [(event, _, doc)] = rec.sent
    assert event == "delivery-late" and doc["destination"] == "pacs" and doc["pending_minutes"] == 31
    assert doc["deliveries"]["pending"] == 1 and doc["deliveries"]["last_error"] == "association rejected"
    no_patient_data(doc)
    clock.t += 60
    assert notifier.tick() == 0  # announced once


def test_a_rerun_resending_old_deliveries_is_not_late_at_once(tmp_path: Path) -> None:
    clock = Clock()
    notifier, catalog, rec = setup(tmp_path, clock, target={"events": ["delivery-late"]}, delivery_late_minutes=30)
    working = [True]
    deliverer = _failing_deliverer(tmp_path, notifier, catalog, clock, working)
    notifier.tick()
    job = _job_with_results(catalog, clock)
    deliverer.tick()  # sent
    clock.t += 2 * 86400  # two days later the study is rerun: the same result UIDs, sent again
    catalog.record_results(job, [("SEG", "2.25.91", "1.2.840.10008.5.1.4.1.1.66.4", "r/1")], ["pacs"], clock.t)
    assert catalog.resend_replaced(job, ["2.25.91"], clock.t, clock.t) == 1
    working[0] = False
    deliverer.tick()
    clock.t += 60
    assert notifier.tick() == 0  # pending for a minute, not two days
    clock.t += 30 * 60
    deliverer.tick()
    assert notifier.tick() == 1 and rec.sent[0][2]["pending_minutes"] == 31


def test_no_delivery_late_for_a_paused_destination(tmp_path: Path) -> None:
    clock = Clock()
    notifier, catalog, rec = setup(tmp_path, clock, target={"events": ["delivery-late"]}, delivery_late_minutes=1)
    deliverer = _failing_deliverer(tmp_path, notifier, catalog, clock, [False])
    notifier.tick()
    _job_with_results(catalog, clock)
    deliverer.tick()
    catalog.set_destination_paused("pacs", True, clock.t)
    clock.t += 600
    assert notifier.tick() == 0 and rec.sent == []


def test_destination_down_then_recovered_and_late_deliveries_folded_in(tmp_path: Path) -> None:
    clock = Clock()
    notifier, catalog, rec = setup(tmp_path, clock, target={"events": ["destination-down", "delivery-late"]},
                                   destination_down_minutes=10, delivery_late_minutes=12)
    working = [False]
    deliverer = _failing_deliverer(tmp_path, notifier, catalog, clock, working)
    notifier.tick()
    _job_with_results(catalog, clock, n=1)
    deliverer.tick()  # fails: failing since t0
    clock.t += 9 * 60
    _job_with_results(catalog, clock, n=2)
    deliverer.tick()
    assert notifier.tick() == 0  # 9 minutes: not yet down, not yet late
    clock.t += 2 * 60
    deliverer.tick()
    assert notifier.tick() == 1  # down
    clock.t += 10 * 60
    deliverer.tick()
    assert notifier.tick() == 0  # both deliveries are late now, but folded into the destination-down event
    [(event, _, doc)] = rec.sent
    assert event == "destination-down" and doc["destination"] == "pacs"
    assert doc["failing_minutes"] == 11 and doc["last_error"] == "association rejected"
    assert doc["pending_deliveries"] == 2
    working[0] = True
    clock.t += 60
    deliverer.tick()  # delivers what is due
    assert notifier.tick() == 1
    assert rec.events() == ["destination-down", "destination-recovered"]
    assert rec.sent[1][2]["destination"] == "pacs" and rec.sent[1][2]["down_event"] == doc["id"]
    # a new outage is a new episode
    working[0] = False
    _job_with_results(catalog, clock, n=3)
    deliverer.tick()
    clock.t += 11 * 60
    deliverer.tick()
    notifier.tick()
    assert rec.events()[-1] == "destination-down" and rec.sent[-1][2]["key"] != doc["key"]


def test_disk_high_and_back_below_the_low_watermark(tmp_path: Path) -> None:
    clock = Clock()
    percent = [95.0]
    notifier, _catalog, rec = setup(tmp_path, clock, usage=lambda: (1000, 950, 50, percent[0]),
                                    target={"events": ["disk-high"]})
    assert notifier.tick() == 1
    [(event, _, doc)] = rec.sent
    assert event == "disk-high"
    assert doc["disk"] == {"used_percent": 95.0, "free_bytes": 50, "total_bytes": 1000,
                           "high_watermark_percent": 90, "low_watermark_percent": 80}
    for p in (96.0, 85.0, 91.0):  # still the same episode (not yet below the low watermark)
        percent[0] = p
        clock.t += 60
        assert notifier.tick() == 0
    percent[0] = 79.0
    clock.t += 60
    assert notifier.tick() == 1 and rec.events() == ["disk-high", "disk-recovered"]
    percent[0] = 92.0
    clock.t += 60
    assert notifier.tick() == 1 and rec.events() == ["disk-high", "disk-recovered", "disk-high"]


@pytest.mark.parametrize("events", [["job-failed"], ["disk-high"]])
def test_a_target_gets_only_what_it_subscribes_to(tmp_path: Path, events: list[str]) -> None:
    clock = Clock()
    notifier, catalog, rec = setup(tmp_path, clock, usage=lambda: (1, 1, 0, 99.0), target={"events": events})
    notifier.tick()
    job = add_job(catalog, clock.t)
    catalog.finish_job(job, JobState.FAILED, clock.t, error="x")
    clock.t += 1
    notifier.tick()
    assert set(rec.events()) == set(events)
