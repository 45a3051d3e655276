"""The catalog: the node's source of truth (SQLite in WAL mode by default; PostgreSQL for several
receivers and workers sharing one, ``catalog.url``; schema by Alembic, :func:`node.db.upgrade`).

Tables (:mod:`node.schema`): studies, series, instances, prior fetches, jobs, results, deliveries,
destination state (paused or not).
Every stage reads and writes here;
queue messages carry only a job id. Transactions are short so many association threads and worker
processes can share one SQLite file without "database is locked" reaching a C-STORE status.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import (
    case,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.catalog_ops import NEW_RUN, DeliveryAndOperatorQueries
from node.catalog_receive import NewInstance, Recorded, record
from node.db import catalog_url, make_engine, upgrade
from node.dicomweb.attributes import IndexedAttributes
from node.group_commit import GroupCommit
from node.policy import Holder, JobPolicy, held_job, last_seen
from node.schema import (
    BINARY_VARIANT,
    LABELMAP_VARIANT,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    PriorFetch,
    PriorFetchState,
    Result,
    Series,
    SeriesOrigin,
    Study,
    StudyState,
)

if TYPE_CHECKING:
    from node.config import Settings


class JobSpec(NamedTuple):
    """One job for :meth:`Catalog.create_jobs` (routing's output)."""

    series_id: int
    model: str
    rule: str
    destinations: tuple[str, ...]
    awaits_prior: bool = False
    """Starts as awaiting-prior: its prior is to be fetched from the PACS first (node.retrieve)."""
    priority: str = "normal"
    """Its rule's priority (``urgent``, ``normal``, ``offpeak``)."""


class ResultFile(NamedTuple):
    """One result object written by a worker, for :meth:`Catalog.record_results`."""

    kind: str
    sop_instance_uid: str
    sop_class_uid: str
    path: str
    variant: str = ""
    series_uid: str = ""
    """With a Series Instance UID the result is also recorded as an instance of its own series in the
    study (origin ``result``), so QIDO-RS/WADO-RS serve it; without, it is only sent."""
    transfer_syntax_uid: str = ""
    size: int = 0
    indexed: IndexedAttributes | None = None
    """Its series- and instance-level attributes (:func:`node.dicomweb.attributes.indexed_attributes`)."""


_INCOMPLETE_PRIORS = (
    select(PriorFetch.prior_study_uid)
    .where(PriorFetch.prior_study_uid.is_not(None))
    .group_by(PriorFetch.prior_study_uid)
    .having(func.sum(case((PriorFetch.state == PriorFetchState.RETRIEVED, 1), else_=0)) == 0)
)
"""Prior study UIDs with no complete fetch (see :meth:`Catalog.incomplete_prior_uids`)."""



class Catalog(DeliveryAndOperatorQueries):
    """Thin, typed access to the catalog database. Safe to share between threads."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        upgrade(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(make_engine(url, read_only=True), expire_on_commit=False)
        self._group_commit: GroupCommit[NewInstance, Recorded] = GroupCommit(self._record_batch)
        self._write_gate: AbstractContextManager[object] = (
            threading.RLock() if self.engine.dialect.name == "sqlite" else nullcontext())
        """SQLite: this process's writers queue here for the database's one write lock, instead of in
        SQLite's busy handler, which sleeps 1, 2, 5, 10... ms between tries (four associations storing
        at once spent more time asleep than writing). Other processes still meet the busy handler."""

    @classmethod
    def for_storage(cls, storage_dir: Path, url: str | None = None) -> Catalog:
        """The catalog at ``url`` (``catalog.url``), by default the SQLite file in ``storage_dir``."""
        if url is not None:
            return cls(url)
        storage_dir.mkdir(parents=True, exist_ok=True)
        return cls(catalog_url(storage_dir))

    @classmethod
    def for_settings(cls, settings: Settings) -> Catalog:
        """The catalog ``settings`` name (``catalog.url``, default the file in ``node.storage_dir``)."""
        return cls.for_storage(settings.node.storage_dir, settings.catalog.url)

    def close(self) -> None:
        """Close the engines' pooled connections."""
        self.engine.dispose()
        read_engine = self._read_sessions.kw["bind"]
        read_engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One short transaction: commit on success, roll back on error."""
        with self._write_gate, self._sessions() as s, s.begin():
            yield s

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only transaction that takes no write lock (DICOMweb queries and retrievals): a long
        scan never delays a C-STORE's commit. Writes made in it are rolled back."""
        with self._read_sessions() as s:
            try:
                yield s
            finally:
                s.rollback()

    # ---- receive ---------------------------------------------------------------------------
    def record_instance(
        self,
        *,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        transfer_syntax_uid: str,
        path: str,
        size: int,
        series_attributes: dict[str, Any],
        now: float,
        patient_key: str | None = None,
        study_datetime: str = "",
        indexed: IndexedAttributes | None = None,
    ) -> Recorded:
        """Record a spooled instance (idempotent: a known SOP Instance is reported, not added).

        A new instance for a study that was already routed re-opens it (late arrival -> rerun).
        ``indexed``: the attributes QIDO-RS matches and returns, kept from a study's and a series'
        first instance that has them. Returns once the row is durable; concurrent callers (several
        associations) share one transaction (:mod:`node.group_commit`).
        """
        return self._group_commit.submit(NewInstance(
            study_uid, series_uid, sop_instance_uid, sop_class_uid, transfer_syntax_uid, path, size,
            series_attributes, now, patient_key, study_datetime, indexed))

    def _record_batch(self, items: Sequence[NewInstance]) -> list[Recorded]:
        """One transaction for ``items`` (the group commit's batch). When it fails on a constraint (a
        duplicate, or another receiver inserting the same row first) each item gets its own, which looks
        the instance up before adding it."""
        try:
            with self.session() as s:
                return [record(s, item, fast=True) for item in items]
        except IntegrityError:
            recorded: list[Recorded] = []
            for item in items:
                try:
                    with self.session() as s:
                        recorded.append(record(s, item, fast=True))
                except IntegrityError:
                    with self.session() as s:  # look again: the row that won is there now
                        recorded.append(record(s, item, fast=False))
            return recorded

    # ---- assemble --------------------------------------------------------------------------
    def mark_quiet_studies_ready(self, quiet_before: float, now: float | None = None) -> list[int]:
        """Studies still receiving whose last instance came before ``quiet_before`` become ready
        (a study fetched as a prior becomes ``prior`` instead and is not returned); ``ready_at`` is
        ``now`` (``quiet_before`` when not given)."""
        ready_at = quiet_before if now is None else now
        with self.session() as s:
            ids = list(
                s.scalars(
                    select(Study.id).where(Study.state == StudyState.RECEIVING, Study.last_received_at <= quiet_before)
                    .with_for_update()  # PostgreSQL: a late instance's reopening waits, or is seen
                )
            )
            return _mark_ready(s, ids, ready_at)

    def mark_complete_studies_ready(self, instances: Mapping[str, int], now: float) -> dict[str, int]:
        """Early completion (:mod:`node.completion`): each study of ``instances`` (Study Instance UID ->
        instance count) still receiving and holding exactly that many instances becomes ready (or
        ``prior``, not returned, like :meth:`mark_quiet_studies_ready`); returns the ready ones (UID -> id)."""
        with self.session() as s:
            rows = s.execute(select(Study.id, Study.study_uid, Study.instance_count).where(
                Study.study_uid.in_(list(instances)), Study.state == StudyState.RECEIVING).with_for_update())
            complete = {uid: i for i, uid, n in rows if instances[uid] == n}
            ready = set(_mark_ready(s, list(complete.values()), now))
            return {uid: i for uid, i in complete.items() if i in ready}

    def studies_in_state(self, state: StudyState) -> list[Study]:
        with self.session() as s:
            return list(s.scalars(select(Study).where(Study.state == state).order_by(Study.id)))

    def series_of_study(self, study_id: int) -> list[Series]:
        """The study's received series (our result series are never routed)."""
        with self.session() as s:
            return list(s.scalars(select(Series).where(Series.study_id == study_id,
                                                       Series.origin == SeriesOrigin.RECEIVED).order_by(Series.id)))

    # ---- priors from the PACS (node.retrieve) ----------------------------------------------
    def jobs_awaiting_prior(self) -> list[tuple[int, int, Series]]:
        """(study id, generation, series) of each study generation with jobs awaiting a prior from
        the PACS (the first such job's series); jobs of a generation the study has left are not listed
        (the next routing supersedes them)."""
        with self.session() as s:
            rows = s.execute(
                select(Job.study_id, Job.generation, Series)
                .join(Study, Study.id == Job.study_id)
                .join(Series, Series.id == Job.series_id)
                .where(Job.state == JobState.AWAITING_PRIOR, Job.generation == Study.generation,
                       Study.state != StudyState.RECEIVING)
                .order_by(Job.id)
            ).all()
        first: dict[tuple[int, int], Series] = {}
        for study_id, generation, series in rows:
            first.setdefault((study_id, generation), series)
        return [(study_id, generation, series) for (study_id, generation), series in first.items()]

    def release_prior_jobs(self, study_id: int, generation: int, now: float) -> int:
        """awaiting-prior -> queued for the jobs of this study generation, if it is still the study's;
        returns how many were released."""
        with self.session() as s:
            current = select(Study.id).where(Study.id == study_id, Study.generation == generation)
            res = s.execute(
                update(Job)
                .where(Job.study_id == study_id, Job.generation == generation, Job.state == JobState.AWAITING_PRIOR,
                       Job.study_id.in_(current))
                .values(state=JobState.QUEUED, updated_at=now)
            )
            return int(res.rowcount)  # type: ignore[attr-defined]

    def has_prior(self, study_id: int, series_id: int) -> bool:
        """Whether :meth:`prior_series` would find a prior for this series."""
        return self.prior_series(Job(study_id=study_id, series_id=series_id)) is not None

    def known_study_uids(self, uids: Sequence[str]) -> set[str]:
        """The UIDs the catalog holds completely (a prior whose fetch was cut short is not known)."""
        with self.session() as s:
            return set(s.scalars(select(Study.study_uid).where(Study.study_uid.in_(list(uids)),
                                                               Study.study_uid.not_in(_INCOMPLETE_PRIORS))))

    def incomplete_prior_uids(self) -> set[str]:
        """Studies fetched as priors whose every fetch failed part-way, was partial or is still under
        way: their series may lack instances, so no job uses them and the next fetch takes them again."""
        with self.session() as s:
            return set(s.scalars(_INCOMPLETE_PRIORS))

    def prior_fetch(self, study_id: int, generation: int) -> PriorFetch | None:
        with self.session() as s:
            return s.scalar(select(PriorFetch).where(PriorFetch.study_id == study_id,
                                                     PriorFetch.generation == generation))

    def record_prior_fetch(self, study_id: int, generation: int, modality: str, state: PriorFetchState, now: float, *,
                           prior_study_uid: str | None = None, note: str | None = None) -> None:
        """Create or update the fetch row of (study, generation); a prior UID once set is kept."""
        with self.session() as s:
            row = s.scalar(select(PriorFetch).where(PriorFetch.study_id == study_id,
                                                    PriorFetch.generation == generation))
            if row is None:
                row = PriorFetch(study_id=study_id, generation=generation, modality=modality)
                s.add(row)
            row.state, row.note, row.updated_at = state, None if note is None else note[:500], now
            if prior_study_uid is not None:
                row.prior_study_uid = prior_study_uid

    # ---- route / jobs ----------------------------------------------------------------------
    def create_jobs(self, study_id: int, generation: int, specs: Sequence[JobSpec], now: float) -> list[int]:
        """Create the jobs and mark the study routed (unrouted without any); jobs of earlier
        generations not started yet are superseded."""
        with self.session() as s:
            study = s.get_one(Study, study_id)
            if study.generation != generation or study.state != StudyState.READY:
                return []  # late instances re-opened the study meanwhile; the next pass routes it
            s.execute(
                update(Job)
                .where(Job.study_id == study_id, Job.generation < generation,
                       Job.state.in_((JobState.QUEUED, JobState.AWAITING_PRIOR)))
                .values(state=JobState.SUPERSEDED, updated_at=now)
            )
            ids: list[int] = []
            for series_id, model, rule, dests, awaits_prior, priority in specs:
                existing = s.scalar(
                    select(Job.id).where(
                        Job.series_id == series_id, Job.model == model, Job.generation == generation
                    )
                )
                if existing is not None:
                    continue
                job = Job(
                    study_id=study_id, series_id=series_id, generation=generation, model=model, rule=rule,
                    destinations=list(dests), created_at=now, updated_at=now, priority=priority,
                    state=JobState.AWAITING_PRIOR if awaits_prior else JobState.QUEUED,
                )
                s.add(job)
                s.flush()
                ids.append(job.id)
            study.state = StudyState.ROUTED if specs else StudyState.UNROUTED
            study.note = None if specs else "no rule matched"
            study.routed_at = now
            return ids

    def get_job(self, job_id: int) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def jobs_in_state(self, *states: JobState) -> list[Job]:
        with self.session() as s:
            return list(s.scalars(select(Job).where(Job.state.in_(states)).order_by(Job.id)))

    def jobs_to_enqueue(self, now: float) -> list[tuple[int, str]]:
        """(job id, model) of queued jobs that have no queue message yet and are due."""
        with self.session() as s:
            rows = s.execute(
                select(Job.id, Job.model).where(Job.state == JobState.QUEUED, Job.enqueued_at.is_(None),
                                                Job.not_before <= now)
            )
            return [(job_id, model) for job_id, model in rows]

    def forget_enqueued(self) -> int:
        """Mark queued jobs as not yet sent, so the node sends them again (after a restart)."""
        with self.session() as s:
            res = s.execute(update(Job).where(Job.state == JobState.QUEUED).values(enqueued_at=None))
            return int(res.rowcount)  # type: ignore[attr-defined]

    def resend_stale_queued(self, now: float, older_than_seconds: float) -> int:
        """Queued jobs sent long ago and still not claimed are sent again (a broker may lose a message
        that a dying worker had taken; a duplicate message is harmless: the first claim wins)."""
        with self.session() as s:
            res = s.execute(
                update(Job)
                .where(Job.state == JobState.QUEUED, Job.enqueued_at < now - older_than_seconds)
                .values(enqueued_at=None)
            )
            return int(res.rowcount)  # type: ignore[attr-defined]

    def mark_enqueued(self, job_id: int, now: float) -> None:
        with self.session() as s:
            s.execute(update(Job).where(Job.id == job_id)
                      .values(enqueued_at=now, first_enqueued_at=func.coalesce(Job.first_enqueued_at, now)))

    def claim_job(self, job_id: int, now: float, *, worker: str, policy: JobPolicy) -> Job | None:
        """queued -> running for ``worker``; None if done, or running in a live worker within its lease.

        A job whose worker died (lease expired, or a dead local pid) is claimed again; a job that has
        used up ``policy.max_attempts`` goes to ``failed`` instead (a poison job stops here).
        """
        with self.session() as s:
            job = s.get(Job, job_id, with_for_update=True)  # PostgreSQL: two workers never both claim it
            if job is None or not (job.state == JobState.QUEUED or (
                    job.state == JobState.RUNNING and policy.abandoned(job, now, last_seen(s, job.worker)))):
                return None
            if job.attempts >= policy.max_attempts:
                job.state, job.updated_at, job.finished_at = JobState.FAILED, now, now
                job.error = f"gave up after {job.attempts} attempt(s); last: {job.error or 'worker lost'}"[:500]
                return None
            if job.state == JobState.RUNNING:
                job.error = "worker lost"
            job.state, job.worker, job.updated_at, job.started_at = JobState.RUNNING, worker, now, now
            job.attempts += 1
            return job

    def finish_job(self, job_id: int, state: JobState, now: float, error: str | None = None, *,
                   holder: Holder | None = None) -> bool:
        """End the job in ``state``; with ``holder`` only if that attempt still holds it (else False)."""
        with self.session() as s:
            if holder is not None and held_job(s, job_id, holder) is None:
                return False
            s.execute(update(Job).where(Job.id == job_id)
                      .values(state=state, error=error, updated_at=now, finished_at=now))
            return True

    def fail_attempt(self, job_id: int, now: float, error: str, policy: JobPolicy, *,
                     holder: Holder | None = None) -> JobState | None:
        """Record a failed attempt: back to queued with backoff, or ``failed`` when attempts are used up;
        None (nothing changed) when ``holder`` no longer holds the job."""
        with self.session() as s:
            job = s.get_one(Job, job_id, with_for_update=True) if holder is None else held_job(s, job_id, holder)
            if job is None:
                return None
            job.error, job.updated_at = error[:500], now
            if job.attempts >= policy.max_attempts:
                job.state, job.finished_at = JobState.FAILED, now
            else:
                job.state, job.enqueued_at = JobState.QUEUED, None
                job.not_before = now + policy.backoff(job.attempts)
            return job.state

    def requeue_abandoned(self, now: float, policy: JobPolicy) -> list[int]:
        """Running jobs whose worker is gone go back to the queue (or to failed when out of attempts)."""
        with self.session() as s:
            changed = []
            for job in s.scalars(select(Job).where(Job.state == JobState.RUNNING).with_for_update()):
                if not policy.abandoned(job, now, last_seen(s, job.worker)):
                    continue
                changed.append(job.id)
                job.updated_at = now
                if job.attempts >= policy.max_attempts:
                    job.state, job.finished_at = JobState.FAILED, now
                    job.error = f"gave up after {job.attempts} attempt(s); last: worker lost"
                else:
                    job.state, job.enqueued_at, job.error = JobState.QUEUED, None, "worker lost"
            return changed

    def retry_jobs(self, *, job_ids: list[int] | None = None, study_id: int | None = None,
                   failed: bool = False) -> int:
        """Put jobs back in the queue with fresh attempts (``dicom-node retry``)."""
        with self.session() as s:
            q = update(Job).where(Job.state.in_((JobState.FAILED, JobState.SKIPPED)))
            if job_ids is not None:
                q = q.where(Job.id.in_(job_ids))
            elif study_id is not None:
                q = q.where(Job.study_id == study_id)
            elif not failed:
                return 0
            res = s.execute(q.values(state=JobState.QUEUED, attempts=0, enqueued_at=None, not_before=0.0, error=None,
                                     **NEW_RUN))
            return int(res.rowcount)  # type: ignore[attr-defined]

    def instances_of_series(self, series_id: int) -> list[Instance]:
        with self.session() as s:
            return list(s.scalars(select(Instance).where(Instance.series_id == series_id).order_by(Instance.id)))

    def get_series(self, series_id: int) -> Series:
        with self.session() as s:
            return s.get_one(Series, series_id)

    # ---- results / deliveries --------------------------------------------------------------
    def record_results(self, job_id: int, results: Sequence[ResultFile | tuple[str, str, str, str]],
                       destinations: list[str], now: float, *, state: JobState = JobState.DONE,
                       error: str | None = None, holder: Holder | None = None) -> bool:
        """Record result objects (kind, sop_instance_uid, sop_class_uid, path[, variant]) and their
        deliveries, and set the job's ``state`` (done; skipped with ``error`` for a not-assessed report),
        in one transaction, so no delivery is sent while the job still reads otherwise. A rerun with the
        same UIDs replaces the files but keeps one result row; its deliveries go back to pending so the
        PACS gets the new version. A :class:`ResultFile` with a ``series_uid`` is also recorded as an instance of a
        result series of the job's study (see :func:`_serve_result`). With ``holder``, nothing is recorded
        (False) unless that attempt still holds the job (fencing: a worker presumed lost comes back late)."""
        with self.session() as s:
            held = s.get_one(Job, job_id) if holder is None else held_job(s, job_id, holder)
            if held is None:
                return False
            study_id = held.study_id
            for item in results:
                kind, sop_uid, sop_class, path = item[:4]
                variant = item.variant if isinstance(item, ResultFile) else ""
                row = s.scalar(select(Result).where(Result.sop_instance_uid == sop_uid))
                if row is None:
                    row = Result(job_id=job_id, kind=kind, sop_instance_uid=sop_uid, sop_class_uid=sop_class,
                                 path=path, variant=variant)
                    s.add(row)
                    s.flush()
                rerun = row.job_id != job_id
                row.job_id, row.path = job_id, path
                for dest in destinations:
                    d = s.scalar(select(Delivery).where(Delivery.result_id == row.id, Delivery.destination == dest))
                    if d is None:
                        s.add(Delivery(result_id=row.id, destination=dest, next_attempt_at=now))
                    elif rerun and d.state in (DeliveryState.SENT, DeliveryState.NOT_NEEDED):
                        d.state, d.next_attempt_at = DeliveryState.PENDING, now
                if isinstance(item, ResultFile) and item.series_uid:
                    _serve_result(s, study_id, item, now)
            s.execute(update(Job).where(Job.id == job_id).values(state=state, error=error, updated_at=now))
            return True

    def prior_series(self, job: Job) -> Series | None:
        """The largest series, of the same modality, in the newest earlier study of the same patient
        (not one whose fetch from the PACS was cut short: see :meth:`incomplete_prior_uids`)."""
        with self.session() as s:
            current = s.get_one(Study, job.study_id)
            series = s.get_one(Series, job.series_id)
            modality = series.modality
            if current.patient_key is None or not modality:
                return None
            candidates = s.execute(
                select(Series, Study)
                .join(Study, Study.id == Series.study_id)
                .where(Study.patient_key == current.patient_key, Study.id != current.id,
                       Series.origin == SeriesOrigin.RECEIVED, Series.instance_count > 0,  # not purged
                       Study.study_datetime <= current.study_datetime,
                       Study.study_uid.not_in(_INCOMPLETE_PRIORS))
            ).all()
            same = [(st.study_datetime, se.instance_count, se.id, se) for se, st in candidates
                    if se.modality == modality]
            return max(same, key=lambda t: t[:3])[3] if same else None

    def previous_result(self, job: Job, kind: str, variant: str = "") -> Result | None:
        """The newest ``kind`` result of an earlier generation of the same series and model (for a
        rerun's Predecessor Documents); ``variant`` ``binary`` looks among BINARY fallbacks only,
        any other value among the rest."""
        binary = Result.variant == BINARY_VARIANT
        same_variant = binary if variant == BINARY_VARIANT else ~binary
        with self.session() as s:
            return s.scalars(
                select(Result)
                .join(Job, Job.id == Result.job_id)
                .where(Job.series_id == job.series_id, Job.model == job.model, Job.generation < job.generation,
                       Result.kind == kind, same_variant)
                .order_by(Job.generation.desc(), Result.id.desc())
                .limit(1)
            ).first()

    # ---- status ----------------------------------------------------------------------------
    def writable(self) -> bool:
        """Whether a write transaction can start now (``/readyz``); a locked SQLite file waits for
        its busy timeout first."""
        with self._write_gate, self.engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE takes the write lock
            conn.exec_driver_sql("SELECT 1")
        return True

    def counts(self) -> dict[str, dict[str, int]]:
        """State counts per table, for ``dicom-node status`` and tests."""
        out: dict[str, dict[str, int]] = {}
        with self.session() as s:
            for name, model in (("studies", Study), ("jobs", Job), ("deliveries", Delivery)):
                rows = s.execute(select(model.state, func.count()).group_by(model.state))
                out[name] = {state: n for state, n in rows}
            out["instances"] = {"total": s.scalar(  # received ones; result objects are counted as results
                select(func.count()).select_from(Instance).join(Series, Series.id == Instance.series_id)
                .where(Series.origin == SeriesOrigin.RECEIVED)) or 0}
            out["results"] = {"total": s.scalar(select(func.count()).select_from(Result)) or 0}
        return out


def _mark_ready(s: Session, ids: list[int], ready_at: float) -> list[int]:
    """Studies ``ids`` become ready, those fetched as priors ``prior``; returns the ready ones."""
    if not ids:
        return ids
    priors = set(s.scalars(select(Study.id).where(
        Study.id.in_(ids), Study.study_uid.in_(select(PriorFetch.prior_study_uid)))))
    ids = [i for i in ids if i not in priors]
    s.execute(update(Study).where(Study.id.in_(ids)).values(state=StudyState.READY, ready_at=ready_at))
    s.execute(update(Study).where(Study.id.in_(list(priors))).values(state=StudyState.PRIOR, ready_at=ready_at))
    return ids


def _serve_result(s: Session, study_id: int, item: ResultFile, now: float) -> None:
    """Record a result file as an instance of its own series (origin ``result``) in the study, for
    QIDO-RS/WADO-RS. The study's receive bookkeeping (instance count, state, generation, times) is
    not touched; a rerun that rewrites the same SOP Instance updates its row, new UIDs add rows. A
    series or instance UID already received (the PACS sent our object back) is left as received.

    The LABELMAP set of a result (:data:`LABELMAP_VARIANT`: the Label Map SEG and the SR citing it)
    is not served: viewers get the BINARY copy, which every one of them opens (OHIF 3.12 draws a
    LABELMAP SEG with an extra Background row and every colour shifted by one)."""
    if item.variant == LABELMAP_VARIANT:
        return
    indexed = item.indexed
    series = s.scalar(select(Series).where(Series.series_uid == item.series_uid))
    if series is None:
        series = Series(series_uid=item.series_uid, study_id=study_id, origin=SeriesOrigin.RESULT,
                        attributes={"Modality": item.kind, "SOPClassUID": item.sop_class_uid},
                        dicom=None if indexed is None else indexed.series, instance_count=0)
        s.add(series)
        s.flush()
    elif series.origin != SeriesOrigin.RESULT:
        return
    elif indexed is not None:
        series.dicom = indexed.series
    instance = s.scalar(select(Instance).where(Instance.sop_instance_uid == item.sop_instance_uid))
    if instance is None:
        s.add(Instance(sop_instance_uid=item.sop_instance_uid, sop_class_uid=item.sop_class_uid, series_id=series.id,
                       path=item.path, size=item.size, transfer_syntax_uid=item.transfer_syntax_uid, received_at=now,
                       dicom=None if indexed is None else indexed.instance))
        series.instance_count += 1
    elif instance.series_id == series.id:
        instance.path, instance.size, instance.received_at = item.path, item.size, now
        instance.sop_class_uid, instance.transfer_syntax_uid = item.sop_class_uid, item.transfer_syntax_uid
        if indexed is not None:
            instance.dicom = indexed.instance
