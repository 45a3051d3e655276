"""Settings of the operations features: storage lifecycle (``storage:``) and notifications
(``notifications:``). Part of the one frozen :class:`node.config.Settings`; kept in their own module
because :mod:`node.config` is long enough.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Frozen(BaseModel):
    """Base of every settings model: unknown keys are errors, values never change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- storage lifecycle -------------------------------------------------------------------------
class RetentionSettings(Frozen):
    """How long a study's files stay after it is settled (every job of its current generation ended and
    every delivery sent). ``None``: kept until the watermarks need the space. Nothing that is not yet
    delivered is ever deleted."""

    instances_days: float | None = Field(None, gt=0)
    """Received instances: this many days after the study's results were delivered (the study, its
    results and history stay, marked purged). Also a prior fetched from the PACS, whole, after it arrived."""
    results_days: float | None = Field(None, gt=0)
    """The whole study (instances, results, catalog rows): this many days after delivery."""
    failed_days: float | None = Field(None, gt=0)
    """The whole study, when a job of it failed for good: this many days after its last job ended."""
    unrouted_days: float | None = Field(None, gt=0)
    """The whole study, when it matched no rule: this many days after routing found none."""


class StorageSettings(Frozen):
    """Retention and high/low watermarks of the storage filesystem (``node.storage_dir``)."""

    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    high_watermark_percent: float = Field(90, gt=0, le=100)
    """Above this share of the filesystem used, the oldest settled studies are purged (whole)..."""
    low_watermark_percent: float = Field(80, gt=0, le=100)
    """...until usage is below this share; when nothing is left to purge, new instances are refused
    (C-STORE 0xA700, STOW-RS 503) until usage is back below the high watermark."""
    check_seconds: float = Field(60, gt=0)
    """How often the node checks retention and the watermarks."""

    @model_validator(mode="after")
    def _order(self) -> StorageSettings:
        if self.low_watermark_percent >= self.high_watermark_percent:
            raise ValueError("storage.low_watermark_percent must be below storage.high_watermark_percent")
        return self


# ---- notifications -------------------------------------------------------------------------------
NotificationEvent = Literal[
    "job-failed",          # a job failed for good (attempts used up, or a permanent error)
    "delivery-late",       # a delivery still pending after notifications.delivery_late_minutes
    "destination-down",    # every attempt to a destination failed for notifications.destination_down_minutes
    "disk-high",           # storage usage above storage.high_watermark_percent
    "worker-lost",         # a running job's worker vanished (its lease expired)
    "results",             # a job produced results (models listed in the target's ``models``)
]
"""Events a notification target may subscribe to."""

ALL_EVENTS: tuple[NotificationEvent, ...] = ("job-failed", "delivery-late", "destination-down", "disk-high",
                                             "worker-lost")
"""The events a target gets when it names none (``results`` must be asked for)."""


class WebhookTarget(Frozen):
    """A JSON POST per event, signed with HMAC-SHA256 over the body (header ``X-Dicom-Node-Signature``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    type: Literal["webhook"]
    url: str = Field(pattern=r"^https?://[^\s/]+(/\S*)?$")
    secret_file: Path | None = None
    """The HMAC key (a private file, like every secret); without it the POST is unsigned."""
    ca_file: Path | None = None
    events: list[NotificationEvent] = Field(default_factory=lambda: list(ALL_EVENTS), min_length=1)
    models: list[str] = Field(default_factory=list)
    """For the ``results`` event: the models whose results are announced (empty: every model)."""
    timeout_seconds: float = Field(10, gt=0)


class EmailTarget(Frozen):
    """An e-mail per event through an SMTP server (``notifications.smtp``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    type: Literal["email"]
    to: list[str] = Field(min_length=1)
    events: list[NotificationEvent] = Field(default_factory=lambda: list(ALL_EVENTS), min_length=1)
    models: list[str] = Field(default_factory=list)


class SmtpSettings(Frozen):
    host: str = Field(min_length=1)
    port: int = Field(25, ge=1, le=65535)
    sender: str = Field(min_length=3, alias="from")
    security: Literal["none", "starttls", "tls"] = "starttls"
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    timeout_seconds: float = Field(30, gt=0)


NotificationTarget = WebhookTarget | EmailTarget


class NotificationSettings(Frozen):
    targets: list[NotificationTarget] = Field(default_factory=list)
    smtp: SmtpSettings | None = None
    delivery_late_minutes: float = Field(30, gt=0)
    destination_down_minutes: float = Field(10, gt=0)
    retry_initial_seconds: float = Field(10, gt=0)
    retry_max_seconds: float = Field(600, gt=0)
    max_attempts: int = Field(20, ge=1)
    """A notification that still fails after this many attempts is dropped (and logged)."""
    poll_seconds: float = Field(5, gt=0)
    """How often the catalog is scanned for events and the outbox for notifications due."""
    dashboard_url: str | None = Field(None, pattern=r"^https?://[^\s/]+(/\S*)?$")
    """The node's address as admins open it (``https://ai-node.example:8080``): payloads link to
    ``<dashboard_url>/studies/<id>``; None: they carry the path only."""

    def files(self) -> list[tuple[str, Path, bool]]:
        """(settings key, path, is a secret) of the files the notifier reads, for
        :func:`node.config.check_files`: HMAC keys and the SMTP password must be private."""
        found: list[tuple[str, Path | None, bool]] = []
        for t in self.targets:
            if isinstance(t, WebhookTarget):
                where = f"notifications.targets[{t.name}]"
                found += [(f"{where}.secret_file", t.secret_file, True), (f"{where}.ca_file", t.ca_file, False)]
        if self.smtp is not None:
            found += [("notifications.smtp.password_file", self.smtp.password_file, True),
                      ("notifications.smtp.ca_file", self.smtp.ca_file, False)]
        out = [(key, path, secret) for key, path, secret in found if path is not None]
        return out

    @model_validator(mode="after")
    def _smtp_needed(self) -> NotificationSettings:
        names = [t.name for t in self.targets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"notifications.targets: duplicate names {dupes}")
        if any(isinstance(t, EmailTarget) for t in self.targets) and self.smtp is None:
            raise ValueError("notifications: e-mail targets need notifications.smtp")
        return self


# ---- catalog database --------------------------------------------------------------------------
class CatalogSettings(Frozen):
    """Where the catalog lives (``catalog:``). Default: the SQLite file ``catalog.sqlite3`` in
    ``node.storage_dir``. Several receivers and workers share one catalog on PostgreSQL:
    ``postgresql+psycopg://user@db-host/dicom_node``; put the password in the environment
    (``DICOM_NODE__CATALOG__URL``), never in the file. The URL is never logged."""

    url: str | None = Field(None, repr=False)

    @model_validator(mode="after")
    def _known_backend(self) -> CatalogSettings:
        if self.url is not None and not self.url.startswith(("sqlite", "postgresql")):
            raise ValueError("catalog.url: only sqlite:/// and postgresql+psycopg:// catalogs are supported")
        return self


# ---- remote workers --------------------------------------------------------------------------------
class RemoteSettings(Frozen):
    """A worker host that needs neither the catalog nor the spool (``remote:``): it claims jobs, fetches
    their inputs and returns results through the node's worker API (``/api/v1/worker``) with a token of
    role ``worker``. It still needs ``queue.broker_url`` and uses ``node.storage_dir`` for temporary files."""

    node_url: str = Field(pattern=r"^https?://[^\s/]+(/\S*)?$")
    """The node's HTTP service, e.g. ``https://ai-node.example:8080``."""
    token_file: Path
    """A private file holding an API token of role ``worker`` (``dicom-node token create --role worker``)."""
    ca_file: Path | None = None
    """PEM bundle trusted for an https ``node_url``; default: the system's trust store."""
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    """This worker host's name in the node's jobs and worker table (``<name>:<pid>``); default the hostname."""
    timeout_seconds: float = Field(60, gt=0)
    """HTTP timeout of one request to the node."""


class RemoteWorkersSettings(Frozen):
    """How the node serves remote workers (``remote_workers:``, on the node)."""

    deidentify: bool = False
    """Serve only de-identified inputs and predecessors (images with burned-in annotation are left out)
    and re-identify the results before they are stored and sent."""
    key_file: Path | None = None
    """The pseudonymisation key (created, private, if missing); default ``<storage_dir>/deid.key``."""


# ---- retrospective batches -------------------------------------------------------------------------
class BatchSettings(Frozen):
    """Retrospective batches over an archive (``batch:``, :mod:`node.batch`): defaults of ``dicom-node batch``."""

    rate_per_hour: float = Field(30, gt=0, le=36000)
    """Studies retrieved per hour when a batch names no rate (spread evenly, one at a time)."""
    method: Literal["move", "get"] = "move"
    """``move``: C-MOVE to ``node.ae_title`` (the PACS must know the node); ``get``: C-GET."""
    timeout_seconds: float = Field(600, gt=0)
    """Cap on one C-FIND, and on the retrieval of one study (the association is aborted then)."""
    max_attempts: int = Field(3, ge=1, le=20)
    """Retrievals of a study before it is failed."""
    find_retry_seconds: float = Field(300, gt=0)
    """A batch whose C-FIND failed (PACS down) asks again after this."""
    poll_seconds: float = Field(5, gt=0)
    """How often the batch loop looks for work."""
