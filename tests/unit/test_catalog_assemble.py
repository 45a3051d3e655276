"""Catalog bookkeeping and quiet-period assembly, driven by a fake clock."""



from node.assemble import Assembler
from node.catalog import Catalog, Recorded
from node.config import Rule
from node.policy import JobPolicy
from node.route import Router


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t



def add(catalog: Catalog, sop: str, now: float, study: str = "1.2.1", series: str = "1.2.1.1") -> Recorded:
    return catalog.record_instance(
        study_uid=study, series_uid=series, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"x/{sop}", size=1,
        series_attributes={"Modality": "CT"}, now=now,
    )


def test_duplicate_instance_recorded_once(catalog: Catalog) -> None:
    first = add(catalog, "1.2.1.1.1", 1.0)
    assert first.new and first.study_event == "new"
    again = add(catalog, "1.2.1.1.1", 2.0)
    assert not again.new and again.study_id == first.study_id and again.study_event is None
    assert catalog.counts()["instances"]["total"] == 1
    assert catalog.studies_in_state("receiving")[0].last_received_at == 1.0  # a duplicate is not activity


def test_quiet_period(catalog: Catalog) -> None:
    clock = FakeClock()
    asm = Assembler(catalog, quiet_seconds=30, clock=clock)
    add(catalog, "1.2.1.1.1", clock.t)
    clock.t += 20
    add(catalog, "1.2.1.1.2", clock.t)
    clock.t += 29.9
    assert asm.tick() == []
    clock.t += 0.2
    ready = asm.tick()
    assert len(ready) == 1
    assert asm.tick() == []  # only once


def test_late_instance_reopens_with_new_generation(catalog: Catalog) -> None:
    clock = FakeClock()
    add(catalog, "1.2.1.1.1", clock.t)
    clock.t += 10
    Assembler(catalog, 5, clock).tick()
    router = Router(catalog, [Rule(name="r", match={"Modality": "CT"}, models=["m"], send_to=[])], clock)
    first = router.route_ready()
    assert len(first) == 1
    assert add(catalog, "1.2.1.1.2", clock.t).study_event == "reopened"
    study = catalog.studies_in_state("receiving")[0]
    assert study.generation == 2
    clock.t += 10
    Assembler(catalog, 5, clock).tick()
    second = router.route_ready()
    assert len(second) == 1 and second != first


def test_unmatched_study_is_recorded(catalog: Catalog) -> None:
    clock = FakeClock()
    add(catalog, "1.2.1.1.1", clock.t)
    clock.t += 10
    Assembler(catalog, 5, clock).tick()
    router = Router(catalog, [Rule(name="r", match={"Modality": "MR"}, models=["m"], send_to=[])], clock)
    assert router.route_ready() == []
    [study] = catalog.studies_in_state("unrouted")
    assert study.note == "no rule matched"


def _one_job(catalog: Catalog, clock: FakeClock) -> int:
    add(catalog, "1.2.1.1.1", clock.t)
    clock.t += 10
    Assembler(catalog, 5, clock).tick()
    [job_id] = Router(catalog, [Rule(name="r", models=["m"])], clock).route_ready()
    return job_id


POLICY = JobPolicy(max_attempts=3, retry_initial_seconds=10, retry_max_seconds=15, lease_seconds=100)


def test_job_claimed_once_and_reclaimed_after_lease(catalog: Catalog) -> None:
    clock = FakeClock()
    job_id = _one_job(catalog, clock)
    assert catalog.claim_job(job_id, clock.t, worker="h:1", policy=POLICY) is not None
    assert catalog.claim_job(job_id, clock.t + 1, worker="h:2", policy=POLICY) is None
    again = catalog.claim_job(job_id, clock.t + 101, worker="h:2", policy=POLICY)
    assert again is not None and again.attempts == 2 and again.worker == "h:2"
    catalog.finish_job(job_id, "done", clock.t)
    assert catalog.claim_job(job_id, clock.t + 1000, worker="h:3", policy=POLICY) is None


def test_dead_local_worker_is_detected_at_once(catalog: Catalog) -> None:
    import subprocess
    import sys

    clock = FakeClock()
    job_id = _one_job(catalog, clock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    policy = JobPolicy(lease_seconds=10_000, local_host="thishost")
    assert catalog.claim_job(job_id, clock.t, worker=f"thishost:{dead.pid}", policy=policy)
    assert catalog.requeue_abandoned(clock.t + 1, JobPolicy(lease_seconds=10_000, local_host="other")) == []
    assert catalog.requeue_abandoned(clock.t + 1, policy) == [job_id]
    job = catalog.get_job(job_id)
    assert job is not None and job.state == "queued" and job.error == "worker lost"


def test_failed_attempts_back_off_then_dead_letter_then_retry(catalog: Catalog) -> None:
    clock = FakeClock()
    job_id = _one_job(catalog, clock)
    catalog.mark_enqueued(job_id, clock.t)
    delays = []
    for attempt in range(1, 4):
        assert catalog.claim_job(job_id, clock.t, worker="h:1", policy=POLICY) is not None
        state = catalog.fail_attempt(job_id, clock.t, "RuntimeError: boom", POLICY)
        job = catalog.get_job(job_id)
        assert job is not None and job.attempts == attempt
        if attempt < 3:
            assert state == "queued" and catalog.jobs_to_enqueue(clock.t) == []  # not before the backoff
            delays.append(job.not_before - clock.t)
            clock.t = job.not_before
            assert catalog.jobs_to_enqueue(clock.t) == [(job_id, "m")]
        else:
            assert state == "failed" and job.error == "RuntimeError: boom"
    assert delays == [10, 15]  # doubling, capped
    assert catalog.claim_job(job_id, clock.t, worker="h:1", policy=POLICY) is None
    assert catalog.counts()["jobs"] == {"failed": 1}
    assert catalog.retry_jobs(failed=True) == 1
    job = catalog.get_job(job_id)
    assert job is not None and (job.state, job.attempts, job.error) == ("queued", 0, None)


def test_worker_lost_every_time_ends_failed(catalog: Catalog) -> None:
    """A job that kills its worker each time (poison) stops after max_attempts claims."""
    clock = FakeClock()
    job_id = _one_job(catalog, clock)
    for _ in range(3):
        assert catalog.claim_job(job_id, clock.t, worker="h:1", policy=POLICY) is not None
        clock.t += 101  # the worker never finishes: its lease runs out
    assert catalog.claim_job(job_id, clock.t, worker="h:1", policy=POLICY) is None
    job = catalog.get_job(job_id)
    assert job is not None and job.state == "failed" and "gave up after 3" in (job.error or "")


def test_results_and_deliveries(catalog: Catalog) -> None:
    clock = FakeClock()
    add(catalog, "1.2.1.1.1", clock.t)
    clock.t += 10
    Assembler(catalog, 5, clock).tick()
    [job_id] = Router(catalog, [Rule(name="r", models=["m"])], clock).route_ready()
    catalog.record_results(job_id, [("SEG", "1.9.1", "1.2.840.10008.5.1.4.1.1.66.4", "r/1.dcm")], ["pacs"], clock.t)
    due = catalog.due_deliveries(clock.t)
    assert [(d.destination, r.kind) for d, r, _ in due] == [("pacs", "SEG")]
    catalog.delivery_failed(due[0][0].id, "down", clock.t + 60)
    assert catalog.due_deliveries(clock.t + 59) == []
    assert len(catalog.due_deliveries(clock.t + 60)) == 1
    catalog.delivery_sent(due[0][0].id, clock.t + 61)
    assert catalog.due_deliveries(clock.t + 1000) == []
    assert catalog.counts()["deliveries"] == {"sent": 1}
    assert catalog.get_job(job_id).state == "done"  # type: ignore[union-attr]


def test_concurrent_associations_share_sqlite(catalog: Catalog) -> None:
    """Eight association threads recording at once: every instance recorded once, no lock errors."""
    import threading

    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(40):
                # two threads per study, overlapping instances: duplicates and races on the same rows
                add(catalog, f"1.2.{t // 2}.1.{i}", float(i), study=f"1.2.{t // 2}", series=f"1.2.{t // 2}.1")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert catalog.counts()["instances"]["total"] == 4 * 40
    assert sum(s.instance_count for s in catalog.studies_in_state("receiving")) == 4 * 40
