"""The catalog's deliveries, per-hop timings and operator actions (retry, rerun, pause): a part of
:class:`node.catalog.Catalog`, kept in its own module (mixed in) so neither file grows past a screenful
of concerns. Every method runs one short transaction of ``self.session()``."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from node.schema import (
    Delivery,
    DeliveryState,
    DestinationState,
    Job,
    JobState,
    Result,
    Study,
    StudyState,
)

if TYPE_CHECKING:
    from node.catalog import JobSpec

NEW_RUN: dict[str, Any] = {"first_enqueued_at": None, "started_at": None, "finished_at": None}
"""Timing columns a job starts again from when it is queued for a new run (retry, rerun)."""

RERUNNABLE = (JobState.DONE, JobState.FAILED, JobState.SKIPPED)
"""Job states a rerun or retry may queue again (queued, running and awaiting-prior are under way)."""


class JobTimings(NamedTuple):
    """What a worker measured for one job (:meth:`Catalog.record_job_timings`)."""

    load_seconds: float
    infer_seconds: float
    encode_seconds: float
    model_version: str


class DeliveryAndOperatorQueries:
    """Deliveries, timings and the REST API's actions; :class:`node.catalog.Catalog` provides
    :meth:`session`."""

    def session(self) -> AbstractContextManager[Session]:
        raise NotImplementedError

    def due_deliveries(self, now: float, limit: int = 100, *,
                       skip_paused: bool = False) -> list[tuple[Delivery, Result, int]]:
        """Pending deliveries whose next attempt is due: (delivery, result, study id); ``skip_paused``
        leaves out those to a paused destination (the deliverer holds them)."""
        with self.session() as s:
            q = (
                select(Delivery, Result, Job.study_id)
                .join(Result, Result.id == Delivery.result_id)
                .join(Job, Job.id == Result.job_id)
                .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
            )
            if skip_paused:
                q = q.where(Delivery.destination.not_in(
                    select(DestinationState.name).where(DestinationState.paused.is_(True))))
            rows = s.execute(q.order_by(Delivery.id).limit(limit))
            return [(d, r, study_id) for d, r, study_id in rows]

    def delivery_sent(self, delivery_id: int, now: float) -> None:
        with self.session() as s:
            s.execute(
                update(Delivery)
                .where(Delivery.id == delivery_id)
                .values(state=DeliveryState.SENT, sent_at=now, attempts=Delivery.attempts + 1, last_error=None,
                        first_attempt_at=func.coalesce(Delivery.first_attempt_at, now))
            )

    def delivery_not_needed(self, delivery_id: int, now: float) -> None:
        """The destination took the other variant of this result (e.g. LABELMAP, not BINARY)."""
        with self.session() as s:
            s.execute(update(Delivery).where(Delivery.id == delivery_id)
                      .values(state=DeliveryState.NOT_NEEDED, sent_at=now, last_error=None,
                              first_attempt_at=func.coalesce(Delivery.first_attempt_at, now)))

    def delivery_failed(self, delivery_id: int, error: str, next_attempt_at: float, now: float | None = None) -> int:
        """Record a failed attempt (made at ``now``); returns the number of attempts so far."""
        with self.session() as s:
            d = s.get_one(Delivery, delivery_id, with_for_update=True)
            if d.first_attempt_at is None and now is not None:
                d.first_attempt_at = now
            d.attempts += 1
            d.last_error = error[:500]
            d.next_attempt_at = next_attempt_at
            return d.attempts

    # ---- per-hop timings and operator actions (REST API) -----------------------------------
    def record_job_timings(self, job_id: int, timings: JobTimings, now: float) -> None:
        """The worker's stage durations and model version for the run that wrote the job's results."""
        with self.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(
                load_seconds=timings.load_seconds, infer_seconds=timings.infer_seconds,
                encode_seconds=timings.encode_seconds, model_version=timings.model_version[:64], finished_at=now))

    def resend_replaced(self, job_id: int, sop_instance_uids: Sequence[str], sent_before: float, now: float) -> int:
        """Deliveries of these results of the job that were sent (or not needed) before ``sent_before``
        (the run's start) go back to pending: a rerun's files replace them in the PACS (same UIDs).
        Returns how many."""
        if not sop_instance_uids:
            return 0
        with self.session() as s:
            results = select(Result.id).where(Result.job_id == job_id,
                                              Result.sop_instance_uid.in_(list(sop_instance_uids)))
            res = s.execute(
                update(Delivery)
                .where(Delivery.result_id.in_(results), Delivery.sent_at < sent_before,
                       Delivery.state.in_((DeliveryState.SENT, DeliveryState.NOT_NEEDED)))
                .values(state=DeliveryState.PENDING, next_attempt_at=now, last_error=None)
            )
            return int(res.rowcount)  # type: ignore[attr-defined]

    def get_study(self, study_id: int) -> Study | None:
        with self.session() as s:
            return s.get(Study, study_id)

    def jobs_of_study(self, study_id: int) -> list[Job]:
        with self.session() as s:
            return list(s.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.id)))

    def get_delivery(self, delivery_id: int) -> Delivery | None:
        with self.session() as s:
            return s.get(Delivery, delivery_id)

    def retry_delivery(self, delivery_id: int, now: float) -> bool:
        """A pending delivery is due now (its backoff is cut short); False if it is not pending."""
        with self.session() as s:
            res = s.execute(update(Delivery)
                            .where(Delivery.id == delivery_id, Delivery.state == DeliveryState.PENDING)
                            .values(next_attempt_at=now))
            return bool(res.rowcount)  # type: ignore[attr-defined]

    def rerun_study(self, study_id: int, now: float, *, model: str | None = None,
                    new_jobs: Sequence[JobSpec] = ()) -> list[int]:
        """Run the study's current generation again: its done, skipped and failed jobs (of ``model``
        only, when given) go back to queued with fresh attempts, and ``new_jobs`` (series the study has
        no job of that model for) are created queued. Returns the job ids queued; [] when the study is
        not routed or unrouted (still receiving, ready, a prior) or nothing could be queued.

        The jobs keep their generation: their results get the same UIDs (same source instances, model
        and version) and replace the earlier ones; the pipeline sends them again
        (:meth:`resend_replaced`). A new generation would make the earlier results the rerun's
        predecessors, i.e. itself.
        """
        with self.session() as s:
            study = s.get(Study, study_id)
            if study is None or study.state not in (StudyState.ROUTED, StudyState.UNROUTED):
                return []
            q = select(Job).where(Job.study_id == study_id, Job.generation == study.generation,
                                  Job.state.in_(RERUNNABLE))
            if model is not None:
                q = q.where(Job.model == model)
            ids: list[int] = []
            for job in s.scalars(q.order_by(Job.id)):
                job.state, job.attempts, job.error, job.updated_at = JobState.QUEUED, 0, None, now
                job.enqueued_at, job.not_before = None, 0.0
                job.first_enqueued_at = job.started_at = job.finished_at = None
                ids.append(job.id)
            for series_id, job_model, rule, dests, _awaits, priority in new_jobs:
                exists = s.scalar(select(Job.id).where(Job.series_id == series_id, Job.model == job_model,
                                                       Job.generation == study.generation))
                if exists is not None:
                    continue
                job = Job(study_id=study_id, series_id=series_id, generation=study.generation, model=job_model,
                          rule=rule, destinations=list(dests), created_at=now, updated_at=now, state=JobState.QUEUED,
                          priority=priority)
                s.add(job)
                s.flush()
                ids.append(job.id)
            if ids and study.state == StudyState.UNROUTED:
                study.state, study.note = StudyState.ROUTED, None
            return ids

    def set_destination_paused(self, name: str, paused: bool, now: float) -> None:
        """Pause (hold its pending deliveries) or resume a destination; on resume its pending
        deliveries are due at once."""
        with self.session() as s:
            row = s.get(DestinationState, name)
            if row is None:
                row = DestinationState(name=name)
                s.add(row)
            row.paused, row.updated_at = paused, now
            if not paused:
                s.execute(update(Delivery)
                          .where(Delivery.destination == name, Delivery.state == DeliveryState.PENDING)
                          .values(next_attempt_at=now))

    def paused_destinations(self) -> set[str]:
        with self.session() as s:
            return set(s.scalars(select(DestinationState.name).where(DestinationState.paused.is_(True))))
