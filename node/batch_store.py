"""The catalog side of retrospective batches (:mod:`node.batch`): validation against the configuration
(:func:`make_spec`), the ``batches`` and ``batch_studies`` queries (:class:`BatchStore`, over
:meth:`node.catalog.Catalog.session`) and progress (counts by state, the estimated finish)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update

from models import registry
from node.batch_query import estimate_finish, format_query, parse_query
from node.catalog import Catalog
from node.config import DimseDestination, Settings
from node.dispatch import OffpeakWindow
from node.schema import Batch, BatchState, BatchStudy, BatchStudyState, Job, JobState, Study, StudyState

log = logging.getLogger("node.batch")

IN_FLIGHT = (BatchStudyState.PENDING, BatchStudyState.RETRIEVING, BatchStudyState.RETRIEVED, BatchStudyState.QUEUED)
"""Study states that keep a batch running."""
JOBS_UNDER_WAY = (JobState.AWAITING_PRIOR, JobState.QUEUED, JobState.RUNNING)


class BatchError(ValueError):
    """A batch that cannot be created or acted on (the message says why; no tag values)."""


@dataclass(frozen=True)
class BatchSpec:
    """A validated batch, ready to be stored."""

    query: dict[str, str]
    source: str
    model: str
    destinations: tuple[str, ...]
    rate_per_hour: float
    anytime: bool = False


@dataclass(frozen=True)
class BatchProgress:
    """A batch and how far it got (counts only: no patient data)."""

    batch: Batch
    counts: dict[str, int]
    """Studies by :class:`BatchStudyState`."""
    total: int
    estimated_finish: float | None
    """When the last study left would start retrieving (None: none left, or the batch is stopped)."""

    @property
    def query_text(self) -> str:
        return format_query(self.batch.query)


def rule_name(batch_id: int) -> str:
    """The ``rule`` of the jobs a batch creates."""
    return f"batch-{batch_id}"


def make_spec(settings: Settings, *, query: str, source: str, model: str, send_to: list[str] | None = None,
              rate_per_hour: float | None = None, anytime: bool = False) -> BatchSpec:
    """Validate a batch against the configuration and the model registry; raise :class:`BatchError`."""
    try:
        parsed = parse_query(query)
    except ValueError as exc:
        raise BatchError(f"query: {exc}") from None
    names = [d.name for d in settings.destinations]
    if source not in names:
        raise BatchError(f"source: unknown destination {source!r}; configured: {', '.join(names) or 'none'}")
    if not isinstance(settings.destination(source), DimseDestination):
        raise BatchError(f"source: {source!r} must be a dimse destination (found by C-FIND, retrieved by "
                         "C-MOVE/C-GET)")
    if model not in registry.available():
        raise BatchError(f"model: unknown model {model!r}; known: {', '.join(registry.available())}")
    destinations = tuple(dict.fromkeys(send_to or [source]))
    unknown = [d for d in destinations if d not in names]
    if unknown:
        raise BatchError(f"send-to: unknown destinations {unknown}")
    rate = settings.batch.rate_per_hour if rate_per_hour is None else rate_per_hour
    if not 0 < rate <= 36000:
        raise BatchError("rate: studies per hour must be above 0 and at most 36000")
    return BatchSpec(parsed, source, model, destinations, float(rate), anytime)


class BatchStore:
    """The catalog queries of batches (over :meth:`node.catalog.Catalog.session`)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def create(self, spec: BatchSpec, now: float) -> int:
        with self.catalog.session() as s:
            row = Batch(query=spec.query, source=spec.source, model=spec.model, destinations=list(spec.destinations),
                        rate_per_hour=spec.rate_per_hour, anytime=spec.anytime, state=BatchState.PENDING,
                        created_at=now, updated_at=now)
            s.add(row)
            s.flush()
            return int(row.id)

    def get(self, batch_id: int) -> Batch | None:
        with self.catalog.session() as s:
            return s.get(Batch, batch_id)

    def page(self, limit: int = 50, offset: int = 0) -> tuple[int, list[Batch]]:
        """Batches, newest first."""
        with self.catalog.session() as s:
            total = s.scalar(select(func.count(Batch.id))) or 0
            rows = list(s.scalars(select(Batch).order_by(Batch.id.desc()).limit(limit).offset(offset)))
            return total, rows

    def counts(self, batch_ids: list[int]) -> dict[int, dict[str, int]]:
        """Batch id -> studies by state."""
        out: dict[int, dict[str, int]] = {i: {} for i in batch_ids}
        with self.catalog.session() as s:
            for batch_id, state, n in s.execute(
                    select(BatchStudy.batch_id, BatchStudy.state, func.count(BatchStudy.id))
                    .where(BatchStudy.batch_id.in_(batch_ids)).group_by(BatchStudy.batch_id, BatchStudy.state)):
                out[batch_id][str(state)] = int(n)
        return out

    def progress(self, batches: list[Batch], now: float, window: OffpeakWindow) -> list[BatchProgress]:
        counts = self.counts([b.id for b in batches])
        out = []
        for b in batches:
            c = counts[b.id]
            left = c.get(BatchStudyState.PENDING, 0) + c.get(BatchStudyState.RETRIEVING, 0)
            eta = (estimate_finish(now, b.last_retrieval_at, left, b.rate_per_hour, None if b.anytime else window)
                   if b.state == BatchState.RUNNING else None)
            out.append(BatchProgress(b, c, sum(c.values()), eta))
        return out

    def cancel(self, batch_id: int, now: float, note: str = "cancelled by an operator") -> Batch | None:
        """Stop retrieving (pending studies are skipped; jobs already queued run). None: no such batch;
        :class:`BatchError` if it already ended."""
        with self.catalog.session() as s:
            b = s.get(Batch, batch_id, with_for_update=True)
            if b is None:
                return None
            if b.state not in (BatchState.PENDING, BatchState.RUNNING):
                raise BatchError(f"batch {batch_id} is {b.state}; only pending or running batches are cancelled")
            b.state, b.note, b.updated_at, b.finished_at = BatchState.CANCELLED, note, now, now
            s.execute(update(BatchStudy).where(BatchStudy.batch_id == batch_id,
                                               BatchStudy.state == BatchStudyState.PENDING)
                      .values(state=BatchStudyState.SKIPPED, error="batch cancelled", updated_at=now))
            return b

    # ---- the loop's queries -------------------------------------------------------------------
    def to_find(self, now: float) -> list[Batch]:
        with self.catalog.session() as s:
            return list(s.scalars(select(Batch).where(Batch.state == BatchState.PENDING, Batch.next_find_at <= now)
                                  .order_by(Batch.id)))

    def store_found(self, batch_id: int, study_uids: list[str], now: float) -> int:
        """The C-FIND's studies (once; duplicates dropped); the batch runs. Returns how many."""
        uids = list(dict.fromkeys(study_uids))
        with self.catalog.session() as s:
            b = s.get(Batch, batch_id, with_for_update=True)
            if b is None or b.state != BatchState.PENDING:
                return 0
            s.add_all(BatchStudy(batch_id=batch_id, study_uid=u, updated_at=now) for u in uids)
            b.state, b.found_at, b.updated_at, b.note = BatchState.RUNNING, now, now, None
            return len(uids)

    def find_failed(self, batch_id: int, note: str, retry_at: float, now: float) -> None:
        with self.catalog.session() as s:
            s.execute(update(Batch).where(Batch.id == batch_id)
                      .values(note=note, next_find_at=retry_at, updated_at=now))

    def running(self) -> list[Batch]:
        with self.catalog.session() as s:
            return list(s.scalars(select(Batch).where(Batch.state == BatchState.RUNNING).order_by(Batch.id)))

    def next_study(self, batch_id: int) -> BatchStudy | None:
        """A study left ``retrieving`` (by a crash) first, then the oldest pending one."""
        with self.catalog.session() as s:
            for state in (BatchStudyState.RETRIEVING, BatchStudyState.PENDING):
                row = s.scalar(select(BatchStudy).where(BatchStudy.batch_id == batch_id, BatchStudy.state == state)
                               .order_by(BatchStudy.id).limit(1))
                if row is not None:
                    return row
        return None

    def start_retrieval(self, row: BatchStudy, last_retrieval_at: float | None, now: float) -> bool:
        """Claim the study: ``retrieving`` (one attempt more) and the batch's throttle clock, in one
        transaction, if neither changed since they were read (``last_retrieval_at``: the batch's then);
        False when another node sharing the catalog took the slot or the study first."""
        with self.catalog.session() as s:
            batch = s.get(Batch, row.batch_id, with_for_update=True)
            study = s.get(BatchStudy, row.id, with_for_update=True)
            if (batch is None or study is None or batch.state != BatchState.RUNNING
                    or batch.last_retrieval_at != last_retrieval_at
                    or (study.state, study.attempts) != (row.state, row.attempts)):
                return False
            study.state, study.attempts, study.updated_at = BatchStudyState.RETRIEVING, study.attempts + 1, now
            batch.last_retrieval_at, batch.updated_at = now, now
            batch.started_at = batch.started_at if batch.started_at is not None else now
            return True

    def set_study(self, row_id: int, state: BatchStudyState, now: float, *, error: str | None = None,
                  instances: int | None = None) -> None:
        values: dict[str, Any] = {"state": state, "error": error, "updated_at": now}
        if instances is not None:
            values["instances"] = instances
        with self.catalog.session() as s:
            s.execute(update(BatchStudy).where(BatchStudy.id == row_id).values(**values))

    def active(self) -> bool:
        """Whether any batch is pending or running (a read that takes no write lock)."""
        with self.catalog.reading() as s:
            return s.scalar(select(Batch.id).where(Batch.state.in_([BatchState.PENDING, BatchState.RUNNING]))
                            .limit(1)) is not None or s.scalar(
                select(BatchStudy.id).where(BatchStudy.state.in_([BatchStudyState.RETRIEVED, BatchStudyState.QUEUED]))
                .limit(1)) is not None

    def link(self, study_uid: str) -> tuple[Batch, BatchStudyState] | None:
        """The batch whose retrieval brought this study (the latest), and the study's state in it."""
        with self.catalog.reading() as s:  # most studies are no batch's: no write lock for them
            if s.scalar(select(BatchStudy.id).where(BatchStudy.study_uid == study_uid).limit(1)) is None:
                return None
        with self.catalog.session() as s:
            row = s.execute(select(Batch, BatchStudy.state).join(BatchStudy, BatchStudy.batch_id == Batch.id)
                            .where(BatchStudy.study_uid == study_uid, BatchStudy.attempts > 0,
                                   BatchStudy.state != BatchStudyState.SKIPPED)
                            .order_by(BatchStudy.id.desc()).limit(1)).first()
            return None if row is None else (row[0], row[1])

    def follow_jobs(self, now: float) -> int:
        """Studies retrieved or queued move on by their study's state and the batch's jobs of its current
        generation; running batches with nothing left are done. Returns the studies that moved."""
        moved = 0
        with self.catalog.session() as s:
            rows = s.execute(
                select(BatchStudy, Study).join(Study, Study.study_uid == BatchStudy.study_uid)
                .where(BatchStudy.state.in_([BatchStudyState.RETRIEVED, BatchStudyState.QUEUED]))).all()
            for row, study in rows:
                state, error = row.state, row.error
                if study.state == StudyState.UNROUTED:
                    state, error = BatchStudyState.SKIPPED, "no series the model takes"
                elif study.state == StudyState.ROUTED:
                    jobs = list(s.scalars(select(Job).where(Job.study_id == study.id,
                                                            Job.generation == study.generation,
                                                            Job.rule == rule_name(row.batch_id))))
                    if not jobs:
                        state, error = BatchStudyState.SKIPPED, "routed without the batch's model"
                    elif any(j.state in JOBS_UNDER_WAY for j in jobs):
                        state = BatchStudyState.QUEUED
                    elif failed := [j for j in jobs if j.state == JobState.FAILED]:
                        state, error = BatchStudyState.FAILED, f"job #{failed[0].id} failed"
                    else:
                        state = BatchStudyState.DONE
                if state != row.state:
                    row.state, row.error, row.updated_at = state, error, now
                    moved += 1
            for b in s.scalars(select(Batch).where(Batch.state == BatchState.RUNNING).with_for_update()):
                left = s.scalar(select(func.count(BatchStudy.id)).where(BatchStudy.batch_id == b.id,
                                                                         BatchStudy.state.in_(IN_FLIGHT)))
                if not left:
                    b.state, b.finished_at, b.updated_at = BatchState.DONE, now, now
                    log.info("batch #%d done", b.id)
        return moved
