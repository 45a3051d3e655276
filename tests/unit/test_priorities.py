"""node.dispatch + node.enqueue: urgent first, fair share per study, off-peak window, in-flight window."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from models.errors import ConfigError
from node.catalog import Catalog, JobSpec
from node.config import Rule, parse_settings
from node.dispatch import Busy, OffpeakWindow, Waiting, choose, most_urgent
from node.enqueue import UNCLAIMED_GRACE_SECONDS, Dispatch, Enqueuer
from node.policy import JobPolicy
from node.route import plan_jobs
from node.schema import JobState

NIGHT = datetime(2026, 3, 2, 23, 30).timestamp()  # local time, like the window
DAY = datetime(2026, 3, 2, 10, 0).timestamp()


def _w(job_id: int, study: int, priority: str = "normal", queue: str = "cpu") -> Waiting:
    return Waiting(job_id, "m", queue, priority, study, float(job_id))


def _ids(jobs: list[Waiting]) -> list[int]:
    return [j.job_id for j in jobs]


def test_urgent_overtakes_waiting_normal_jobs() -> None:
    waiting = [_w(1, 1), _w(2, 1), _w(3, 2), _w(9, 3, "urgent")]
    assert _ids(choose(waiting, [], capacity=lambda q: 1, offpeak_open=False)) == [9]
    assert _ids(choose(waiting, [], capacity=lambda q: 4, offpeak_open=False))[0] == 9


def test_full_queue_sends_nothing_and_queues_are_independent() -> None:
    waiting = [_w(1, 1), _w(2, 2, queue="gpu")]
    busy = [Busy("cpu", 5, "normal")]
    assert _ids(choose(waiting, busy, capacity=lambda q: 1, offpeak_open=True)) == [2]


def test_fair_share_one_big_study_cannot_starve_others() -> None:
    """Study 1 has 40 series queued first; study 2 and 3 come later with one each."""
    waiting = [_w(i, 1) for i in range(1, 41)] + [_w(100, 2), _w(101, 3)]
    # study 1 already has a job running: the next free slot goes to another study
    assert _ids(choose(waiting, [Busy("cpu", 1, "normal")], capacity=lambda q: 2, offpeak_open=False)) == [100]
    # four free slots: round robin over the studies, oldest first within each
    assert _ids(choose(waiting, [], capacity=lambda q: 4, offpeak_open=False)) == [1, 100, 101, 2]


def test_least_recently_served_study_goes_first_on_equal_load() -> None:
    waiting = [_w(1, 1), _w(2, 2)]
    assert _ids(choose(waiting, [], capacity=lambda q: 1, offpeak_open=False, last_served={1: 50.0, 2: 10.0})) == [2]
    assert _ids(choose(waiting, [], capacity=lambda q: 1, offpeak_open=False, last_served={1: 50.0})) == [2]
    assert _ids(choose(waiting, [], capacity=lambda q: 1, offpeak_open=False)) == [1]  # then the oldest


def test_offpeak_waits_for_the_window_or_an_idle_queue() -> None:
    batch = [_w(1, 1, "offpeak"), _w(2, 1, "offpeak")]
    clinical = [_w(3, 2)]
    # inside the window: off-peak runs, after any clinical job
    assert _ids(choose(batch + clinical, [], capacity=lambda q: 3, offpeak_open=True)) == [3, 1, 2]
    # outside: not while a clinical job waits or runs on the queue...
    assert _ids(choose(batch + clinical, [], capacity=lambda q: 3, offpeak_open=False)) == [3]
    assert _ids(choose(batch, [Busy("cpu", 2, "normal")], capacity=lambda q: 3, offpeak_open=False)) == []
    # ...but an idle queue (or one busy with off-peak work only) takes it
    assert _ids(choose(batch, [], capacity=lambda q: 1, offpeak_open=False)) == [1]
    assert _ids(choose(batch, [Busy("cpu", 1, "offpeak")], capacity=lambda q: 2, offpeak_open=False)) == [1]
    # a clinical job busy on another queue does not hold this one
    assert _ids(choose(batch, [Busy("gpu", 2, "urgent")], capacity=lambda q: 1, offpeak_open=False)) == [1]


@pytest.mark.parametrize(("window", "hour", "minute", "inside"), [
    ("22:00-06:00", 23, 30, True), ("22:00-06:00", 5, 59, True), ("22:00-06:00", 6, 0, False),
    ("22:00-06:00", 12, 0, False), ("22:00-06:00", 22, 0, True), ("01:00-05:30", 5, 29, True),
    ("01:00-05:30", 0, 59, False), ("00:00-00:00", 12, 0, True),
])
def test_offpeak_window_in_local_time(window: str, hour: int, minute: int, inside: bool) -> None:
    now = datetime(2026, 3, 2, hour, minute).timestamp()
    assert OffpeakWindow.parse(window).contains(now) is inside


def test_rule_priority_is_validated_and_the_most_urgent_matching_rule_wins() -> None:
    with pytest.raises(ConfigError):
        parse_settings({"rules": [{"name": "r", "models": ["m"], "priority": "asap"}]})
    with pytest.raises(ConfigError):
        parse_settings({"queue": {"offpeak_window": "25:00-06:00"}})
    with pytest.raises(ConfigError):
        parse_settings({"queue": {"in_flight": {"gpu": 0}}})
    rules = [Rule(name="all-ct", match={"Modality": "CT"}, models=["m"]),
             Rule(name="stroke", match={"BodyPartExamined": "HEAD"}, models=["m"], priority="urgent"),
             Rule(name="batch", match={"Modality": "CT"}, models=["n"], priority="offpeak")]
    specs = plan_jobs(rules, [(1, {"Modality": "CT", "BodyPartExamined": "HEAD"}), (2, {"Modality": "CT"})])
    assert {(s.series_id, s.model): (s.rule, s.priority) for s in specs} == {
        (1, "m"): ("all-ct", "urgent"), (1, "n"): ("batch", "offpeak"),
        (2, "m"): ("all-ct", "normal"), (2, "n"): ("batch", "offpeak")}
    assert most_urgent("offpeak", "normal") == "normal"


class FakeApp:
    def __init__(self) -> None:
        self.sent: list[tuple[int, str, dict[str, Any]]] = []

    def send_task(self, name: str, args: list[Any], queue: str, **options: Any) -> None:
        self.sent.append((args[0], queue, options))


def _study(catalog: Catalog, n: int, series: int, priority: str, now: float) -> list[int]:
    uid = f"1.2.{n}"
    for k in range(series):
        catalog.record_instance(study_uid=uid, series_uid=f"{uid}.{k}", sop_instance_uid=f"{uid}.{k}.1",
                                sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                                path="x", size=1, series_attributes={"Modality": "CT"}, now=now)
    [study_id] = catalog.mark_quiet_studies_ready(now + 1)
    specs = [JobSpec(s.id, "m", "r", (), priority=priority) for s in catalog.series_of_study(study_id)]
    return catalog.create_jobs(study_id, 1, specs, now + 1)


def test_enqueuer_keeps_the_window_and_sends_urgent_next(tmp_path: Path) -> None:
    """The catalog-backed loop: 1 slot; a 5-series normal study, then an urgent one and an off-peak one."""
    settings = parse_settings({"node": {"storage_dir": str(tmp_path)}, "queue": {"offpeak_window": "22:00-06:00"}})
    catalog = Catalog.for_storage(tmp_path)
    clock = [DAY]
    app = FakeApp()
    enq = Enqueuer(app, catalog, lambda: clock[0], dispatch=Dispatch.from_settings(settings))
    normal = _study(catalog, 1, 5, "normal", DAY)
    assert enq.enqueue_pending() == 1 and enq.enqueue_pending() == 0  # the window is full
    offpeak = _study(catalog, 2, 1, "offpeak", DAY)
    urgent = _study(catalog, 3, 1, "urgent", DAY)
    # the sent job is claimed, runs and ends: the slot goes to the urgent job, not to the next normal one
    assert catalog.claim_job(normal[0], DAY, worker="h:1", policy=JobPolicy()) is not None
    assert enq.enqueue_pending() == 0  # running counts as in flight
    catalog.finish_job(normal[0], JobState.DONE, DAY)
    assert enq.enqueue_pending() == 1
    assert [s[0] for s in app.sent] == [normal[0], urgent[0]]
    # a message no worker claims (lost by the broker) stops holding the slot after a grace period
    clock[0] = DAY + UNCLAIMED_GRACE_SECONDS - 1
    assert enq.enqueue_pending() == 0
    clock[0] = DAY + UNCLAIMED_GRACE_SECONDS + 1
    assert [j.job_id for j in enq.next_jobs(clock[0])] == [normal[1]]
    clock[0] = DAY
    # unsent queued jobs are not stale: the lease-based resend leaves them (and the sent one) alone
    assert catalog.resend_stale_queued(DAY + 10, 3600) == 0
    # the urgent job ends; the normal ones go on, the off-peak job waits for the night...
    for _ in normal[1:]:
        catalog.finish_job(app.sent[-1][0], JobState.DONE, DAY)  # the job sent last ends
        assert enq.enqueue_pending() == 1
    assert [s[0] for s in app.sent] == [normal[0], urgent[0], *normal[1:]]
    catalog.finish_job(normal[-1], JobState.DONE, DAY)
    # ...or an idle queue: nothing clinical waits or runs now, so it goes
    assert enq.enqueue_pending() == 1 and app.sent[-1][0] == offpeak[0]
    assert all(opts == {"soft_time_limit": 1800, "time_limit": 1860} for _, _, opts in app.sent)


def test_offpeak_job_waits_while_clinical_work_runs_until_night(tmp_path: Path) -> None:
    settings = parse_settings({"node": {"storage_dir": str(tmp_path)}, "queue": {"in_flight": {"cpu": 2}}})
    catalog = Catalog.for_storage(tmp_path)
    clock = [DAY]
    app = FakeApp()
    enq = Enqueuer(app, catalog, lambda: clock[0], dispatch=Dispatch.from_settings(settings))
    [normal] = _study(catalog, 1, 1, "normal", DAY)
    [batch] = _study(catalog, 2, 1, "offpeak", DAY)
    assert enq.enqueue_pending() == 1 and app.sent[-1][0] == normal  # a free slot, but the day is not off-peak
    clock[0] = NIGHT
    assert enq.enqueue_pending() == 1 and app.sent[-1][0] == batch
    assert time.localtime(NIGHT).tm_hour == 23
