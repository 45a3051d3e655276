"""Response and request bodies of the REST API (``/api/v1``), so that ``/openapi.json`` documents them.

Times are UNIX seconds (float) as the catalog stores them; None: that stage has not happened (yet).
No model here has a field for patient name, ID or birth date except :class:`StudyDicom`, the body
of the one route that returns patient attributes.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from node.schema import DeliveryState, JobState, StudyState

T = TypeVar("T")


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, protected_namespaces=())


class Page(_Out, Generic[T]):
    items: list[T]
    total: int = Field(description="rows matching the filters, all pages together")
    limit: int
    offset: int


class StudyCounts(_Out):
    series: int
    instances: int
    results: int
    jobs: dict[str, int] = Field(description="jobs of every generation by state")
    deliveries: dict[str, int] = Field(description="deliveries by state")


class StudyTimes(_Out):
    first_received_at: float
    last_received_at: float
    ready_at: float | None = Field(description="the quiet period ended (assembler)")
    routed_at: float | None = Field(description="routing created the jobs (or none)")
    first_enqueued_at: float | None = Field(description="the first job of the current generation was sent to a queue")
    jobs_started_at: float | None = Field(description="a worker first claimed one of its current jobs")
    jobs_finished_at: float | None = Field(description="its last current job ended (None while any is unfinished)")
    delivered_at: float | None = Field(description="its last delivery was sent (None while any is pending)")


class StudySummary(_Out):
    id: int = Field(description="catalog id")
    study_uid: str
    state: StudyState
    generation: int
    note: str | None
    counts: StudyCounts
    times: StudyTimes


class SeriesOut(_Out):
    id: int
    series_uid: str
    instance_count: int
    attributes: dict[str, Any] = Field(description="routing attributes (Modality, SeriesDescription, ...)")


class JobTimes(_Out):
    created_at: float
    first_enqueued_at: float | None
    enqueued_at: float | None = Field(description="its last queue message")
    not_before: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    load_seconds: float | None
    infer_seconds: float | None
    encode_seconds: float | None


class JobOut(_Out):
    id: int
    study_id: int
    series_id: int
    generation: int
    model: str
    model_version: str | None
    rule: str
    destinations: list[str]
    state: JobState
    attempts: int
    worker: str | None
    error: str | None
    times: JobTimes


class ResultOut(_Out):
    id: int
    job_id: int
    kind: str
    sop_instance_uid: str
    sop_class_uid: str
    variant: str


class DeliveryOut(_Out):
    id: int
    result_id: int
    job_id: int
    study_id: int
    kind: str = Field(description="the result object's kind (SEG, SR, ...)")
    sop_instance_uid: str
    destination: str
    destination_paused: bool
    state: DeliveryState
    attempts: int
    last_error: str | None
    next_attempt_at: float
    first_attempt_at: float | None
    sent_at: float | None


class StudyDetail(StudySummary):
    series: list[SeriesOut]
    jobs: list[JobOut]
    results: list[ResultOut]
    deliveries: list[DeliveryOut]


class StudyDicom(_Out):
    """The study's patient and study attributes (PHI): asked for explicitly, never cached."""

    study_id: int
    source: Literal["catalog", "instance"] = Field(
        description="where they were read: the catalog, or a spooled instance (studies recorded before the "
        "catalog kept them)")
    attributes: dict[str, Any] = Field(description="DICOM JSON (PS3.18 F.2), keyed by tag")


class DestinationOut(_Out):
    name: str
    type: Literal["dimse", "dicomweb"]
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None
    calling_ae_title: str | None = None
    url: str | None = Field(None, description="without any user:password part")
    auth: Literal["basic", "bearer"] | None = Field(None, description="how it authenticates (secrets are never shown)")
    accepts_labelmap: bool | None = None
    max_request_mb: float | None = None
    paused: bool
    deliveries: dict[str, int] = Field(description="deliveries to it by state")


class ModelOut(_Out):
    name: str
    version: str
    family: str
    description: str
    modalities: list[str]
    min_slices: int
    runtime: str
    extra: str | None = Field(description="the optional extra it needs (None: the base install)")
    missing_modules: list[str] = Field(description="modules of that extra not installed here")
    queue: str
    rules: list[str] = Field(description="rules that name it")


class RerunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="rerun (or run) this model only; default: every job of the study")


class RerunOut(_Out):
    study_id: int
    generation: int
    jobs: list[int] = Field(description="ids of the jobs queued")
