"""Catalog bookkeeping and quiet-period assembly, driven by a fake clock."""

from pathlib import Path

import pytest

from node.assemble import Assembler
from node.catalog import Catalog, Recorded
from node.config import Rule
from node.route import Router


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog.for_storage(tmp_path)


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


def test_job_claimed_once_and_reclaimed_after_lease(catalog: Catalog) -> None:
    clock = FakeClock()
    add(catalog, "1.2.1.1.1", clock.t)
    clock.t += 10
    Assembler(catalog, 5, clock).tick()
    [job_id] = Router(catalog, [Rule(name="r", models=["m"])], clock).route_ready()
    assert catalog.claim_job(job_id, clock.t, lease_seconds=100) is not None
    assert catalog.claim_job(job_id, clock.t + 1, lease_seconds=100) is None
    again = catalog.claim_job(job_id, clock.t + 101, lease_seconds=100)
    assert again is not None and again.attempts == 2
    catalog.finish_job(job_id, "done", clock.t)
    assert catalog.claim_job(job_id, clock.t + 1000, lease_seconds=100) is None


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
