"""Catalog tables (SQLAlchemy ORM): studies, series, instances, prior fetches, jobs, results,
deliveries, destination state, API tokens, with their typed states. :mod:`node.catalog` holds the
queries; new columns need a scalar default so that :func:`node.db.add_missing_columns` can add them
to an existing catalog.

States are :class:`enum.StrEnum` members stored as their string values (VARCHAR columns, as
before): they compare equal to those strings, and mypy checks every assignment.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Boolean, Enum, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class StudyState(StrEnum):
    """receiving -> ready -> routed | unrouted; back to receiving when late instances arrive;
    receiving -> prior for a study fetched from the PACS as another study's prior (never routed)."""

    RECEIVING = "receiving"
    READY = "ready"
    ROUTED = "routed"
    UNROUTED = "unrouted"
    PRIOR = "prior"


class JobState(StrEnum):
    """awaiting-prior -> queued -> running -> done | skipped | failed | superseded (see :class:`Job`)."""

    AWAITING_PRIOR = "awaiting-prior"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class DeliveryState(StrEnum):
    """pending -> sent | not-needed (the destination took the other variant of the result)."""

    PENDING = "pending"
    SENT = "sent"
    NOT_NEEDED = "not-needed"


class SeriesOrigin(StrEnum):
    """Where a series' instances come from: received (C-STORE, STOW-RS, a prior fetched from the PACS),
    or our own result objects (written by a worker, served by QIDO-RS/WADO-RS, never routed)."""

    RECEIVED = "received"
    RESULT = "result"


class PriorFetchState(StrEnum):
    """retrieving -> retrieved | partial | failed; or not-found / no-query without a retrieval."""

    RETRIEVING = "retrieving"
    RETRIEVED = "retrieved"
    PARTIAL = "partial"
    FAILED = "failed"
    NOT_FOUND = "not-found"
    NO_QUERY = "no-query"


LABELMAP_VARIANT = "labelmap"
"""Result files only for a destination that accepts Label Map Segmentation Storage (with the SR citing it)."""
BINARY_VARIANT = "binary"
"""The same results encoded for a destination that does not (BINARY SEG, SR citing that SEG)."""


def _state(enum: type[StrEnum]) -> Enum:
    """A state column: VARCHAR(16) holding the member's value, read back as the member."""
    return Enum(enum, native_enum=False, create_constraint=False, length=16, validate_strings=True,
                values_callable=lambda members: [m.value for m in members])


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[StudyState] = mapped_column(_state(StudyState), default=StudyState.RECEIVING, index=True)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    """Incremented when instances arrive after routing; jobs of the new generation supersede."""
    first_received_at: Mapped[float] = mapped_column(Float)
    last_received_at: Mapped[float] = mapped_column(Float)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    note: Mapped[str | None] = mapped_column(Text, default=None)
    patient_key: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    """SHA-256 of Patient ID + Issuer: finds a patient's prior studies (Patient ID + Issuer as one key)."""
    study_datetime: Mapped[str] = mapped_column(String(32), default="")
    """StudyDate + StudyTime as sent (orders a patient's studies)."""
    ready_at: Mapped[float | None] = mapped_column(Float, default=None)
    """When the quiet period made it ready (assembler; the latest generation's)."""
    routed_at: Mapped[float | None] = mapped_column(Float, default=None)
    """When routing created its jobs (or found none: unrouted)."""
    patient_id: Mapped[str] = mapped_column(String(64), default="", server_default="", index=True)
    """Patient ID as sent (QIDO-RS matching; the node serves its studies over DICOMweb, so the catalog
    holds the attributes a query answers, see :mod:`node.dicomweb.attributes`). Never logged."""
    patient_name: Mapped[str] = mapped_column(String(324), default="", server_default="")
    """Patient Name (its Alphabetic group) as sent, for QIDO-RS matching."""
    study_date: Mapped[str] = mapped_column(String(8), default="", server_default="", index=True)
    accession_number: Mapped[str] = mapped_column(String(16), default="", server_default="", index=True)
    dicom: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    """Study-level attributes of its first instance as DICOM JSON (QIDO-RS); None in rows written
    before this column existed."""


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """The routing attributes (config.MATCHABLE_ATTRIBUTES) taken from the first instance (JSON)."""
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    origin: Mapped[SeriesOrigin] = mapped_column(_state(SeriesOrigin), default=SeriesOrigin.RECEIVED,
                                                 server_default=SeriesOrigin.RECEIVED.value, index=True)
    """``result`` for a series of our own result objects (``Catalog.record_results``): served over
    DICOMweb, ignored by routing, priors and the receive bookkeeping."""
    dicom: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    """Series-level attributes of its first instance as DICOM JSON (QIDO-RS)."""

    @property
    def routing_attributes(self) -> dict[str, Any]:
        """What rules match on: :attr:`attributes` plus ``NumberOfInstances``."""
        return {**self.attributes, "NumberOfInstances": self.instance_count}

    @property
    def modality(self) -> str:
        """The series' Modality ("" when the instance had none)."""
        return str(self.attributes.get("Modality") or "")


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
    dicom: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    """Instance-level attributes (Instance Number, Rows, Columns, Number of Frames...) as DICOM JSON."""


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
    state: Mapped[PriorFetchState] = mapped_column(_state(PriorFetchState))
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
    destinations: Mapped[list[str]] = mapped_column(JSON, default=list)
    """Names of the destinations the results go to (JSON list)."""
    state: Mapped[JobState] = mapped_column(_state(JobState), default=JobState.QUEUED, index=True)
    """queued -> running -> done | skipped | failed (dead letter, with ``error``) | superseded;
    a failed attempt goes back to queued (with backoff) until ``queue.job_max_attempts``. A job of a
    registration model whose prior is being fetched from the PACS starts as awaiting-prior
    (:mod:`node.retrieve` moves it to queued when the fetch ends, whatever its outcome)."""
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
    first_enqueued_at: Mapped[float | None] = mapped_column(Float, default=None)
    """When its first queue message of this run was sent (``enqueued_at`` is reset on every requeue)."""
    started_at: Mapped[float | None] = mapped_column(Float, default=None)
    """When a worker last claimed it."""
    finished_at: Mapped[float | None] = mapped_column(Float, default=None)
    """When it ended done, skipped or failed."""
    load_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    infer_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    encode_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    """Stage durations of the run that produced its results (written by the worker)."""
    model_version: Mapped[str | None] = mapped_column(String(64), default=None)
    """Version of the model that produced its results."""


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
    Segmentation SOP class, else the binary set (see :mod:`node.send.dimse`): :data:`LABELMAP_VARIANT`,
    :data:`BINARY_VARIANT`."""


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("result_id", "destination"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[DeliveryState] = mapped_column(_state(DeliveryState), default=DeliveryState.PENDING, index=True)
    """Stays pending (with backoff) while the destination fails."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float, default=0.0)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    sent_at: Mapped[float | None] = mapped_column(Float, default=None)
    first_attempt_at: Mapped[float | None] = mapped_column(Float, default=None)
    """When the first send of it was attempted (whatever its outcome)."""


class DestinationState(Base):
    """Operator state of a destination (``POST /api/v1/destinations/{name}/pause``): its pending
    deliveries are held while paused and become due at once on resume. No row: not paused."""

    __tablename__ = "destination_state"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[float] = mapped_column(Float, default=0.0)


class ApiToken(Base):
    """A bearer token of the HTTP service (``dicom-node token create``): only its SHA-256 is kept, never
    the token. A revoked token keeps its row (``revoked_at``); its name may then be given to a new one."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(16))
    """A :class:`node.roles.Role` value."""
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    """Hex SHA-256 of the token."""
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, default=None)
    last_used_at: Mapped[float | None] = mapped_column(Float, default=None)
    """Updated at most once a minute per token (:mod:`node.tokens`)."""


class NotificationEventRow(Base):
    """An event announced by :mod:`node.notify` (job failed, destination down, ...): one row per fact,
    found once by its ``key`` (e.g. ``job-failed:12:1733130000.000``), never announced twice."""

    __tablename__ = "notify_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    event: Mapped[str] = mapped_column(String(32), index=True)
    """``job-failed``, ``destination-down``, ``destination-recovered``, ... (:mod:`node.notify.events`)."""
    subject: Mapped[str] = mapped_column(String(64), default="", index=True)
    """What an episode is about (a destination name, ``disk``), to find the open one; "" for single facts."""
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """The facts sent (catalog ids, model, destination, error text, counts; no patient data)."""
    created_at: Mapped[float] = mapped_column(Float)


class NotificationOutbox(Base):
    """One notification of one event to one target (``notifications.targets``): retried with backoff
    until sent or ``notifications.max_attempts`` (then ``dropped``)."""

    __tablename__ = "notify_outbox"
    __table_args__ = (UniqueConstraint("event_id", "target"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("notify_events.id"), index=True)
    target: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    """``pending`` -> ``sent`` | ``dropped``."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float, default=0.0)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    sent_at: Mapped[float | None] = mapped_column(Float, default=None)


class NotificationMark(Base):
    """The notifier's durable marks: where its scan of the catalog starts (``since``)."""

    __tablename__ = "notify_marks"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[float] = mapped_column(Float, default=0.0)


class WorkerHeartbeat(Base):
    """A worker process alive (``workers.heartbeat``): written every few seconds by each Celery pool
    child, removed when it stops; a row not updated for a while is a worker lost. Its current job is
    the running job whose ``worker`` is ``host:pid``."""

    __tablename__ = "workers"
    __table_args__ = (UniqueConstraint("host", "pid"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    host: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[str] = mapped_column(String(256), default="")
    """The queues its worker consumes, comma-separated."""
    started_at: Mapped[float] = mapped_column(Float)
    last_seen_at: Mapped[float] = mapped_column(Float, index=True)
    job_id: Mapped[int | None] = mapped_column(Integer, default=None)
    """The job it runs now (None: idle)."""
    gpu: Mapped[str | None] = mapped_column(String(128), default=None)
    """The CUDA device's name once torch initialised CUDA in the process; None: no GPU in use."""


class PurgeJournal(Base):
    """A purge whose catalog rows are deleted but whose files may not be yet (:mod:`node.lifecycle.purge`):
    written in the transaction that deletes the rows, removed once the files are unlinked; the node
    finishes what a crash left at start-up."""

    __tablename__ = "purge_journal"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64))
    paths: Mapped[list[str]] = mapped_column(JSON, default=list)
    """Files to unlink, relative to the storage directory."""
    dirs: Mapped[list[str]] = mapped_column(JSON, default=list)
    """Directories to remove once empty, deepest first."""
    created_at: Mapped[float] = mapped_column(Float)


class PurgeMark(Base):
    """A study whose received instances were purged (``storage.retention.instances_days``): its rows,
    jobs and results stay (the history), QIDO-RS/WADO-RS no longer list the instances, reruns are refused."""

    __tablename__ = "purge_marks"
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    purged_at: Mapped[float] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(String(32))
    files: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(Integer, default=0)
