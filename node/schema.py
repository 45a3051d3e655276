"""Catalog tables (SQLAlchemy ORM): studies, series, instances, prior fetches, jobs, results,
deliveries. :mod:`node.catalog` holds the queries; new columns need a scalar default so that
:func:`node.catalog.add_missing_columns` can add them to an existing catalog."""

from __future__ import annotations

from sqlalchemy import Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    """receiving -> ready -> routed | unrouted; back to receiving when late instances arrive.
    ready -> awaiting-prior -> ready while its prior is fetched from the PACS (node.retrieve);
    receiving -> prior for a study fetched as a prior (stored, never routed)."""
    generation: Mapped[int] = mapped_column(Integer, default=1)
    """Incremented when instances arrive after routing; jobs of the new generation supersede."""
    first_received_at: Mapped[float] = mapped_column(Float)
    last_received_at: Mapped[float] = mapped_column(Float)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    note: Mapped[str | None] = mapped_column(Text, default=None)
    patient_key: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    """SHA-256 of Patient ID + Issuer: finds a patient's prior studies without storing the ID."""
    study_datetime: Mapped[str] = mapped_column(String(32), default="")
    """StudyDate + StudyTime as sent (orders a patient's studies)."""


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    attributes: Mapped[str] = mapped_column(Text, default="{}")
    """JSON of the routing attributes (config.MATCHABLE_ATTRIBUTES) taken from the first instance."""
    instance_count: Mapped[int] = mapped_column(Integer, default=0)


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    path: Mapped[str] = mapped_column(Text)
    """Relative to the spool root."""
    size: Mapped[int] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[float] = mapped_column(Float)


class PriorFetch(Base):
    """One attempt to fetch a study's prior from the PACS (node.retrieve); one per study generation.

    A study whose UID is ``prior_study_uid`` of any row becomes ``prior`` instead of ``ready``: it is
    recorded here before its retrieval starts, so its instances are never routed."""

    __tablename__ = "prior_fetches"
    __table_args__ = (UniqueConstraint("study_id", "generation"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    """The current study that needs the prior."""
    generation: Mapped[int] = mapped_column(Integer)
    modality: Mapped[str] = mapped_column(String(16))
    prior_study_uid: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    state: Mapped[str] = mapped_column(String(16))
    """retrieving -> retrieved | partial | failed; or not-found / no-query without a retrieval."""
    note: Mapped[str | None] = mapped_column(Text, default=None)
    """Why it failed (no tag values)."""
    updated_at: Mapped[float] = mapped_column(Float)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("series_id", "model", "generation"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    generation: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(128))
    rule: Mapped[str] = mapped_column(String(128))
    destinations: Mapped[str] = mapped_column(Text, default="[]")
    """JSON list of destination names the results go to."""
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    """queued -> running -> done | skipped | failed (dead letter, with ``error``) | superseded;
    a failed attempt goes back to queued (with backoff) until ``queue.job_max_attempts``."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    enqueued_at: Mapped[float | None] = mapped_column(Float, default=None)
    """When a queue message was last sent for it; None = not yet (the node loop sends it)."""
    not_before: Mapped[float] = mapped_column(Float, default=0.0)
    """A retried job is not sent before this time (exponential backoff)."""
    worker: Mapped[str | None] = mapped_column(String(128), default=None)
    """``host:pid`` of the process that claimed it, to detect a worker that died mid-job."""
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class Result(Base):
    __tablename__ = "results"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    variant: Mapped[str] = mapped_column(String(16), default="")
    """"" for every destination; ``labelmap`` / ``binary`` for the two alternative SEG (+ SR)
    encodings of one result: a destination gets the labelmap set if it accepts the Label Map
    Segmentation SOP class, else the binary set (see :mod:`node.send.dimse`)."""


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("result_id", "destination"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    """pending -> sent, or pending -> not-needed (the destination took the other variant); stays
    pending (with backoff) while the destination fails."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float, default=0.0)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    sent_at: Mapped[float | None] = mapped_column(Float, default=None)
