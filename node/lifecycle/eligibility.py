"""Which studies may be purged, and why: a pure core over :class:`StudyFacts` (no catalog, no clock).

A study is **settled** when nothing about it is still to happen: it is routed (or unrouted, or a prior
fetched from the PACS), every job of every generation ended (done, skipped, failed, superseded: none
awaiting a prior, queued or running) and no delivery of its results is pending. A settled study is
still **protected** while another study that is not settled may read it as a prior (same patient key,
or fetched from the PACS for it). Only settled, unprotected studies are eligible; nothing that is not
yet delivered is ever deleted.

What goes, by rule (``storage.retention``; days counted from ``settled_at``):

=====================  =====================================  ============================================
study                  rule                                   what goes
=====================  =====================================  ============================================
a job failed for good  ``failed_days`` after its last job end  the whole study (files and rows)
unrouted               ``unrouted_days`` after routing         the whole study
prior (fetched)        ``instances_days`` after it arrived     the whole study (a copy of the PACS's)
routed, delivered      ``results_days`` after delivery         the whole study
routed, delivered      ``instances_days`` after delivery       received instances only (``instances``)
any settled            watermark (oldest ``settled_at`` first) the whole study
=====================  =====================================  ============================================
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from node.config_ops import RetentionSettings
from node.schema import JobState, StudyState

DAY = 86400.0

TERMINAL = frozenset({JobState.DONE, JobState.SKIPPED, JobState.FAILED, JobState.SUPERSEDED})
"""Job states after which nothing more happens to a job."""


class Scope(StrEnum):
    """What a purge of one study removes."""

    INSTANCES = "instances"
    """The received instances (rows and files); the study, its jobs, results and deliveries stay,
    marked purged (:class:`node.schema.PurgeMark`)."""
    STUDY = "study"
    """Everything: instances, results, jobs, deliveries, prior fetches, series and the study row."""


class Reason(StrEnum):
    """Why a study goes: the retention key that made it due, or the watermark."""

    INSTANCES_DAYS = "instances_days"
    RESULTS_DAYS = "results_days"
    FAILED_DAYS = "failed_days"
    UNROUTED_DAYS = "unrouted_days"
    WATERMARK = "watermark"


@dataclass(frozen=True)
class StudyFacts:
    """What the eligibility rules read of one study (built from the catalog by :mod:`.facts`)."""

    study_id: int
    study_uid: str
    state: StudyState
    last_received_at: float
    routed_at: float | None = None
    patient_key: str | None = None
    current_jobs: tuple[JobState, ...] = ()
    """States of the jobs of the study's current generation."""
    unfinished_jobs: int = 0
    """Jobs of any generation awaiting a prior, queued or running."""
    pending_deliveries: int = 0
    last_job_end: float | None = None
    """When the last job of the current generation ended (finished or last updated)."""
    last_sent_at: float | None = None
    """When the last delivery of its results was sent."""
    received_instances: int = 0
    """Received instances still on disk (0 after an instances purge)."""
    fetched_for: tuple[int, ...] = ()
    """Studies that fetched this one from the PACS as their prior."""


@dataclass(frozen=True)
class Verdict:
    """The rules' answer for one study at one moment."""

    study_id: int
    settled: bool
    why: str
    """Why it is kept (``receiving``, ``jobs under way``, ...), or why it goes; no patient data."""
    settled_at: float | None = None
    scope: Scope | None = None
    """What retention removes now (None: nothing is due; the watermarks may still take a settled study)."""
    reason: Reason | None = None
    due_at: float | None = None
    """When retention next makes it go (None: never by retention)."""


def _busy(f: StudyFacts) -> str | None:
    """Why the study itself is not settled (None: it is, unless protected)."""
    if f.state == StudyState.RECEIVING:
        return "receiving"
    if f.state == StudyState.READY:
        return "ready, not routed yet"
    if f.unfinished_jobs or any(s not in TERMINAL for s in f.current_jobs):
        return "jobs under way"
    if f.pending_deliveries:
        return "deliveries pending"
    return None


def settled_at(f: StudyFacts) -> float:
    """When a settled study settled: its delivery (or last job end) for a routed study, routing for an
    unrouted one, its last instance for a prior."""
    if f.state == StudyState.ROUTED:
        ends = [t for t in (f.last_sent_at, f.last_job_end) if t is not None]
        return max(ends) if ends else (f.routed_at or f.last_received_at)
    if f.state == StudyState.UNROUTED:
        return f.routed_at or f.last_received_at
    return f.last_received_at


def _retention(f: StudyFacts, at: float, r: RetentionSettings) -> list[tuple[float, Scope, Reason]]:
    """(due time, scope, reason) of every retention rule that applies to a settled study."""
    out: list[tuple[float, Scope, Reason]] = []

    def add(days: float | None, scope: Scope, reason: Reason) -> None:
        if days is not None:
            out.append((at + days * DAY, scope, reason))

    if f.state == StudyState.UNROUTED:
        add(r.unrouted_days, Scope.STUDY, Reason.UNROUTED_DAYS)
    elif f.state == StudyState.PRIOR:
        add(r.instances_days, Scope.STUDY, Reason.INSTANCES_DAYS)
    elif JobState.FAILED in f.current_jobs:
        add(r.failed_days, Scope.STUDY, Reason.FAILED_DAYS)
    else:
        add(r.results_days, Scope.STUDY, Reason.RESULTS_DAYS)
        if f.received_instances:
            add(r.instances_days, Scope.INSTANCES, Reason.INSTANCES_DAYS)
    return out


def decide_all(facts: Sequence[StudyFacts], retention: RetentionSettings, now: float) -> dict[int, Verdict]:
    """The verdict of every study in ``facts`` at ``now``. Protection is computed among ``facts``: pass
    the studies of the same patients (and the studies that fetched them) together."""
    busy = {f.study_id: _busy(f) for f in facts}
    unsettled_keys: dict[str, set[int]] = defaultdict(set)
    for f in facts:
        if busy[f.study_id] is not None and f.patient_key:
            unsettled_keys[f.patient_key].add(f.study_id)
    out: dict[int, Verdict] = {}
    for f in facts:
        why = busy[f.study_id]
        if why is None and (unsettled_keys.get(f.patient_key or "", set()) - {f.study_id}
                            or any(busy.get(s) is not None for s in f.fetched_for)):
            why = "a possible prior of a study not settled"
        if why is not None:
            out[f.study_id] = Verdict(f.study_id, False, why)
            continue
        at = settled_at(f)
        rules = _retention(f, at, retention)
        due = [x for x in rules if x[0] <= now]
        if due:  # the whole study wins over its instances alone
            when, scope, reason = min(due, key=lambda x: (x[1] != Scope.STUDY, x[0]))
            out[f.study_id] = Verdict(f.study_id, True, f"retention {reason} due", at, scope, reason, when)
        else:
            nxt = min(rules, default=None, key=lambda x: x[0])
            why = "retention not due yet" if nxt else "kept until the watermarks need the space"
            out[f.study_id] = Verdict(f.study_id, True, why, at, due_at=nxt[0] if nxt else None)
    return out


def watermark_order(verdicts: Iterable[Verdict]) -> list[Verdict]:
    """Settled studies, oldest ``settled_at`` first: the order the watermarks purge them in."""
    return sorted((v for v in verdicts if v.settled), key=lambda v: (v.settled_at or 0.0, v.study_id))
