"""The pure eligibility core of the storage lifecycle: settled or not, protected priors, retention
rules and their scope, watermark order."""

from __future__ import annotations

import pytest

from node.config_ops import RetentionSettings
from node.lifecycle.eligibility import DAY, Reason, Scope, StudyFacts, decide_all, watermark_order
from node.schema import JobState, StudyState

DONE = (JobState.DONE,)


def delivered(study_id: int = 1, *, sent: float = 0.0, **kw: object) -> StudyFacts:
    base: dict[str, object] = {"study_id": study_id, "study_uid": f"1.2.{study_id}", "state": StudyState.ROUTED,
                               "last_received_at": sent - 100, "routed_at": sent - 50, "current_jobs": DONE,
                               "last_job_end": sent - 10, "last_sent_at": sent, "received_instances": 5,
                               "patient_key": f"k{study_id}"}
    base.update(kw)
    return StudyFacts(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("facts", "why"), [
    (delivered(state=StudyState.RECEIVING), "receiving"),
    (delivered(state=StudyState.READY), "ready, not routed yet"),
    (delivered(current_jobs=(JobState.DONE, JobState.RUNNING)), "jobs under way"),
    (delivered(current_jobs=(JobState.AWAITING_PRIOR,)), "jobs under way"),
    (delivered(unfinished_jobs=1), "jobs under way"),  # a queued job of an earlier generation
    (delivered(pending_deliveries=1), "deliveries pending"),
])
def test_never_what_is_not_settled(facts: StudyFacts, why: str) -> None:
    retention = RetentionSettings(instances_days=1, results_days=1, failed_days=1, unrouted_days=1)
    v = decide_all([facts], retention, now=1000 * DAY)[1]
    assert (v.settled, v.why, v.scope) == (False, why, None)


def test_delivered_instances_then_results() -> None:
    retention = RetentionSettings(instances_days=2, results_days=30)
    f = delivered(sent=10 * DAY)
    before = decide_all([f], retention, now=11.9 * DAY)[1]
    assert before.settled and before.scope is None and before.due_at == 12 * DAY
    inst = decide_all([f], retention, now=12 * DAY)[1]
    assert (inst.scope, inst.reason, inst.settled_at) == (Scope.INSTANCES, Reason.INSTANCES_DAYS, 10 * DAY)
    whole = decide_all([f], retention, now=40 * DAY)[1]
    assert (whole.scope, whole.reason) == (Scope.STUDY, Reason.RESULTS_DAYS)
    # after the instances went: only the results rule is left
    purged = decide_all([delivered(sent=10 * DAY, received_instances=0)], retention, now=13 * DAY)[1]
    assert purged.scope is None and purged.due_at == 40 * DAY


def test_settled_at_is_the_last_delivery_or_job_end() -> None:
    retention = RetentionSettings(results_days=1)
    late_job = delivered(sent=5 * DAY, last_job_end=8 * DAY)  # e.g. a skipped job after the delivery
    assert decide_all([late_job], retention, now=8.5 * DAY)[1].scope is None
    assert decide_all([late_job], retention, now=9 * DAY)[1].scope == Scope.STUDY
    no_delivery = delivered(last_sent_at=None, last_job_end=3 * DAY, current_jobs=(JobState.SKIPPED,))
    assert decide_all([no_delivery], retention, now=4 * DAY)[1].settled_at == 3 * DAY


def test_failed_and_unrouted_have_their_own_days() -> None:
    retention = RetentionSettings(instances_days=1, results_days=1, failed_days=10, unrouted_days=3)
    failed = delivered(current_jobs=(JobState.DONE, JobState.FAILED), last_sent_at=None, last_job_end=0.0)
    assert decide_all([failed], retention, now=9 * DAY)[1].scope is None  # instances_days does not apply
    v = decide_all([failed], retention, now=10 * DAY)[1]
    assert (v.scope, v.reason) == (Scope.STUDY, Reason.FAILED_DAYS)
    unrouted = StudyFacts(2, "1.2.2", StudyState.UNROUTED, last_received_at=0.0, routed_at=1 * DAY)
    assert decide_all([unrouted], retention, now=3.9 * DAY)[2].scope is None
    assert decide_all([unrouted], retention, now=4 * DAY)[2].reason == Reason.UNROUTED_DAYS


def test_none_keeps_until_the_watermarks() -> None:
    v = decide_all([delivered(sent=0.0)], RetentionSettings(), now=10_000 * DAY)[1]
    assert v.settled and v.scope is None and v.due_at is None
    assert v.why == "kept until the watermarks need the space"


def test_a_prior_of_a_busy_study_is_protected() -> None:
    retention = RetentionSettings(results_days=1)
    old = delivered(1, sent=0.0, patient_key="same")
    busy = delivered(2, sent=50 * DAY, patient_key="same", current_jobs=(JobState.QUEUED,))
    v = decide_all([old, busy], retention, now=100 * DAY)
    assert not v[1].settled and v[1].why == "a possible prior of a study not settled"
    assert decide_all([old, delivered(2, sent=50 * DAY, patient_key="same")], retention, 100 * DAY)[1].settled
    # fetched from the PACS for study 3 (another patient key: the PACS's copy), which waits for it
    fetched = StudyFacts(4, "1.2.4", StudyState.PRIOR, last_received_at=0.0, fetched_for=(3,))
    waiting = delivered(3, current_jobs=(JobState.AWAITING_PRIOR,), patient_key=None)
    assert not decide_all([fetched, waiting], RetentionSettings(instances_days=1), 100 * DAY)[4].settled
    done = decide_all([fetched, delivered(3, patient_key=None)], RetentionSettings(instances_days=1), 100 * DAY)
    assert (done[4].scope, done[4].reason) == (Scope.STUDY, Reason.INSTANCES_DAYS)
    # no patient key: no protection through it
    lone = [delivered(5, patient_key=None), delivered(6, patient_key=None, state=StudyState.RECEIVING)]
    assert decide_all(lone, retention, 100 * DAY)[5].settled


def test_watermark_order_is_oldest_settled_first() -> None:
    facts = [delivered(1, sent=30.0), delivered(2, sent=10.0), delivered(3, state=StudyState.RECEIVING),
             StudyFacts(4, "1.2.4", StudyState.UNROUTED, last_received_at=0.0, routed_at=20.0)]
    order = watermark_order(decide_all(facts, RetentionSettings(), now=100.0).values())
    assert [v.study_id for v in order] == [2, 4, 1]
