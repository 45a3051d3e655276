"""The catalog shell of the eligibility rules: :class:`StudyFacts` from a few grouped queries, and what
a purge of a study would remove (files, bytes, rows)."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import ColumnElement, Select, and_, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from node.lifecycle.eligibility import Scope, StudyFacts
from node.schema import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    PriorFetch,
    PurgeMark,
    Result,
    Series,
    SeriesOrigin,
    Study,
)

UNFINISHED = (JobState.AWAITING_PRIOR, JobState.QUEUED, JobState.RUNNING)


def _in(column: InstrumentedAttribute[int], ids: Collection[int] | None) -> ColumnElement[bool]:
    return column.in_(list(ids)) if ids is not None else and_(True)


def load_facts(s: Session, study_ids: Collection[int] | None = None) -> list[StudyFacts]:
    """The facts of the studies ``study_ids`` (None: every study)."""
    studies = s.execute(select(Study.id, Study.study_uid, Study.state, Study.generation, Study.last_received_at,
                               Study.routed_at, Study.patient_key).where(_in(Study.id, study_ids))).all()
    if not studies:
        return []
    current: dict[int, list[JobState]] = defaultdict(list)
    unfinished: dict[int, int] = defaultdict(int)
    job_end: dict[int, float] = {}
    gen = {row.id: row.generation for row in studies}
    for sid, g, state, finished, updated in s.execute(
            select(Job.study_id, Job.generation, Job.state, Job.finished_at, Job.updated_at)
            .where(_in(Job.study_id, study_ids))):
        if state in UNFINISHED:
            unfinished[sid] += 1
        if g == gen.get(sid):
            current[sid].append(JobState(state))
            end = finished if finished is not None else updated
            job_end[sid] = max(job_end.get(sid, end), end)
    pending: dict[int, int] = defaultdict(int)
    sent: dict[int, float] = {}
    for sid, dstate, n, last in s.execute(
            select(Job.study_id, Delivery.state, func.count(), func.max(Delivery.sent_at))
            .join(Result, Result.job_id == Job.id).join(Delivery, Delivery.result_id == Result.id)
            .where(_in(Job.study_id, study_ids)).group_by(Job.study_id, Delivery.state)):
        if dstate == DeliveryState.PENDING:
            pending[sid] += int(n)
        if last is not None:
            sent[sid] = max(sent.get(sid, last), last)
    received = dict(s.execute(
        select(Series.study_id, func.sum(Series.instance_count))
        .where(Series.origin == SeriesOrigin.RECEIVED, _in(Series.study_id, study_ids))
        .group_by(Series.study_id)).all())
    fetched: dict[str, set[int]] = defaultdict(set)
    uids = {row.study_uid for row in studies}
    for uid, sid in s.execute(select(PriorFetch.prior_study_uid, PriorFetch.study_id)
                              .where(PriorFetch.prior_study_uid.is_not(None))):
        if uid is not None and uid in uids:
            fetched[uid].add(sid)
    return [StudyFacts(
        study_id=row.id, study_uid=row.study_uid, state=row.state, last_received_at=row.last_received_at,
        routed_at=row.routed_at, patient_key=row.patient_key, current_jobs=tuple(current[row.id]),
        unfinished_jobs=unfinished[row.id], pending_deliveries=pending[row.id], last_job_end=job_end.get(row.id),
        last_sent_at=sent.get(row.id), received_instances=int(received.get(row.id) or 0),
        fetched_for=tuple(sorted(fetched[row.study_uid] - {row.id}))) for row in studies]


def related_ids(s: Session, study_id: int) -> set[int]:
    """The study, the studies of its patient and the studies that fetched it as a prior: what
    :func:`node.lifecycle.eligibility.decide_all` needs to judge it."""
    row = s.execute(select(Study.study_uid, Study.patient_key).where(Study.id == study_id)).one_or_none()
    if row is None:
        return set()
    cond = PriorFetch.prior_study_uid == row.study_uid
    ids = {study_id, *s.scalars(select(PriorFetch.study_id).where(cond))}
    if row.patient_key:
        ids |= set(s.scalars(select(Study.id).where(Study.patient_key == row.patient_key)))
    return ids


@dataclass(frozen=True)
class Footprint:
    """What purging one study with a scope removes."""

    paths: tuple[str, ...]
    """Files, relative to the storage directory (each once)."""
    bytes: int
    rows: int


def footprint(s: Session, study_id: int, scope: Scope, storage_dir: Path | None = None) -> Footprint:
    """Files, bytes and catalog rows a purge of ``study_id`` with ``scope`` removes. Bytes are the
    catalog's instance sizes, plus (with ``storage_dir``) the stat'ed sizes of result files that are not
    also recorded as instances."""
    series_cond = Series.study_id == study_id
    if scope == Scope.INSTANCES:
        series_cond = and_(series_cond, Series.origin == SeriesOrigin.RECEIVED)
    inst = s.execute(select(Instance.path, Instance.size).join(Series, Series.id == Instance.series_id)
                     .where(series_cond)).all()
    paths = dict.fromkeys(p for p, _ in inst)
    size = sum(int(n or 0) for _, n in inst)
    rows = len(inst)
    if scope == Scope.STUDY:
        results = s.execute(select(Result.path).join(Job, Job.id == Result.job_id)
                            .where(Job.study_id == study_id)).scalars().all()
        for p in results:
            if p not in paths:
                paths[p] = None
                if storage_dir is not None:
                    with contextlib.suppress(OSError):
                        size += (storage_dir / p).stat().st_size
        rows += len(results)
        rows += int(s.scalar(select(func.count()).select_from(Delivery).join(Result, Result.id == Delivery.result_id)
                             .join(Job, Job.id == Result.job_id).where(Job.study_id == study_id)) or 0)
        rows += int(s.scalar(select(func.count()).select_from(Job).where(Job.study_id == study_id)) or 0)
        rows += int(s.scalar(select(func.count()).select_from(Series).where(Series.study_id == study_id)) or 0)
        rows += int(s.scalar(select(func.count()).select_from(PriorFetch).where(PriorFetch.study_id == study_id)) or 0)
        rows += int(s.scalar(select(func.count()).select_from(PurgeMark).where(PurgeMark.study_id == study_id)) or 0)
        rows += 1
    return Footprint(tuple(paths), size, rows)


def unserved_results() -> ColumnElement[bool]:
    """Result rows whose file is not also an instance row's (the LABELMAP set, results only sent)."""
    return ~select(Instance.id).where(Instance.sop_instance_uid == Result.sop_instance_uid,
                                      Instance.path == Result.path).exists()


def _per_study(s: Session, stmt: Select[int, int]) -> dict[int, int]:
    return {int(k): int(n or 0) for k, n in s.execute(stmt).all()}


def footprints(s: Session, scopes: Mapping[int, Scope], storage_dir: Path | None = None,
               chunk: int = 500) -> dict[int, tuple[int, int, int]]:
    """(files, bytes, rows) of purging each study of ``scopes`` with its scope, by grouped queries (a
    plan of thousands of studies); the same figures as :func:`footprint`, without listing paths."""
    out: dict[int, tuple[int, int, int]] = {}
    ids = sorted(scopes)
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        inst: dict[int, dict[str, tuple[int, int]]] = defaultdict(dict)
        for sid, origin, n, size in s.execute(
                select(Series.study_id, Series.origin, func.count(Instance.id), func.sum(Instance.size))
                .join(Instance, Instance.series_id == Series.id).where(Series.study_id.in_(part))
                .group_by(Series.study_id, Series.origin)):
            inst[sid][str(origin)] = (int(n), int(size or 0))
        by_job = Job.study_id.in_(part)
        results = _per_study(s, select(Job.study_id, func.count(Result.id)).join(Result, Result.job_id == Job.id)
                             .where(by_job).group_by(Job.study_id))
        unserved: dict[int, list[str]] = defaultdict(list)
        for sid, path in s.execute(select(Job.study_id, Result.path).join(Result, Result.job_id == Job.id)
                                   .where(by_job, unserved_results())):
            unserved[sid].append(path)
        counts = [_per_study(s, select(Job.study_id, func.count(Delivery.id)).join(Result, Result.job_id == Job.id)
                             .join(Delivery, Delivery.result_id == Result.id).where(by_job).group_by(Job.study_id)),
                  _per_study(s, select(Job.study_id, func.count(Job.id)).where(by_job).group_by(Job.study_id)),
                  _per_study(s, select(Series.study_id, func.count(Series.id)).where(Series.study_id.in_(part))
                             .group_by(Series.study_id)),
                  _per_study(s, select(PriorFetch.study_id, func.count(PriorFetch.id))
                             .where(PriorFetch.study_id.in_(part)).group_by(PriorFetch.study_id)),
                  _per_study(s, select(PurgeMark.study_id, func.count()).where(PurgeMark.study_id.in_(part))
                             .group_by(PurgeMark.study_id))]
        for sid in part:
            received = inst[sid].get(SeriesOrigin.RECEIVED.value, (0, 0))
            if scopes[sid] == Scope.INSTANCES:
                out[sid] = (received[0], received[1], received[0])
                continue
            served = inst[sid].get(SeriesOrigin.RESULT.value, (0, 0))
            extra = 0
            if storage_dir is not None:
                for p in unserved[sid]:
                    with contextlib.suppress(OSError):
                        extra += (storage_dir / p).stat().st_size
            files = received[0] + served[0] + len(unserved[sid])
            rows = received[0] + served[0] + results.get(sid, 0) + sum(c.get(sid, 0) for c in counts) + 1
            out[sid] = (files, received[1] + served[1] + extra, rows)
    return out


def purged_ids(s: Session, study_ids: Collection[int] | None = None) -> dict[int, float]:
    """Studies whose instances were purged, and when."""
    return dict(s.execute(select(PurgeMark.study_id, PurgeMark.purged_at)
                          .where(_in(PurgeMark.study_id, study_ids))).all())
