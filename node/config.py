"""Settings: one YAML file, validated once by pydantic, frozen, passed to every stage.

There is no module-level mutable configuration. ``load_settings(path)`` returns a frozen
:class:`Settings`; secrets (a broker password, say) come from the environment as
``DICOM_NODE__<SECTION>__<KEY>`` (double underscores separate levels), e.g.
``DICOM_NODE__QUEUE__BROKER_URL=redis://:secret@10.0.0.5:6379/0``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from models.errors import ConfigError
from node.config_models import ModelSettings
from node.config_ops import (
    BatchSettings,
    CatalogSettings,
    NotificationSettings,
    RemoteSettings,
    RemoteWorkersSettings,
    StorageSettings,
)
from node.config_ops import Frozen as _Frozen
from node.roles import Role
from node.syslog import facility_number

ENV_PREFIX = "DICOM_NODE__"
"""Environment variables with this prefix override YAML keys (``__`` separates levels)."""

AE_TITLE_PATTERN = r"^[\x20-\x5b\x5d-\x7e]{1,16}$"
"""DICOM AE titles: 1-16 printable characters, no backslash."""

HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")
"""A DNS host name (RFC 1123 labels)."""

MATCHABLE_ATTRIBUTES: tuple[str, ...] = (
    "Modality",
    "BodyPartExamined",
    "SeriesDescription",
    "StudyDescription",
    "ProtocolName",
    "Manufacturer",
    "ManufacturerModelName",
    "ImageType",
    "SliceThickness",
    "SOPClassUID",
    "CallingAETitle",
    "NumberOfInstances",
    "ScanningSequence",
    "SequenceVariant",
    "EchoTime",
    "RepetitionTime",
    "MagneticFieldStrength",
    "ViewPosition",
)
"""Series attributes a rule may match on (recorded per series at receive time). MR rules select a
sequence with ScanningSequence / SequenceVariant (multi-valued, e.g. ``SE``, ``IR``, ``GR``), EchoTime
and RepetitionTime (ms, ranges) and MagneticFieldStrength (T); radiograph rules the ViewPosition
(``PA``, ``AP``, ``LL``...)."""


PeerService = Literal["echo", "store", "find", "move", "get"]
"""DIMSE services a peer may invoke (the node serves echo and store; find, move and get are reserved)."""


class Peer(_Frozen):
    """A calling AE allowed to associate (``node.peers``)."""

    ae_title: str = Field(pattern=AE_TITLE_PATTERN)
    """Its calling AE title (exact, case-sensitive; leading/trailing spaces are not significant)."""
    host: str | None = None
    """Where it may connect from: an IP address, a CIDR network (``10.1.2.0/24``) or a host name
    (resolved at each association); None: any address."""
    allow: list[PeerService]
    """What it may do: ``echo`` (C-ECHO), ``store`` (C-STORE); ``find``, ``move``, ``get`` are reserved."""
    whole_study_per_association: bool = False
    """True: it sends each study whole in one association (a PACS or router), so a study it stored is
    ready once its associations were released normally (:mod:`node.completion`), not after the quiet period."""

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip()
        try:
            if "/" in v:
                return str(ipaddress.ip_network(v, strict=True))
            return str(ipaddress.ip_address(v))
        except ValueError as exc:
            if "/" in v:
                raise ValueError(f"{v!r} is not a CIDR network ({exc})") from None
        if not HOSTNAME.fullmatch(v):
            raise ValueError(f"{v!r} is neither an IP address, a CIDR network nor a host name")
        return v.lower()


class TlsServerSettings(_Frozen):
    """DICOM TLS for the Storage SCP (``node.tls``): TLS 1.2+ with BCP 195 ciphers (``node.tls`` module)."""

    port: int = Field(ge=1, le=65535)
    """The TLS port (2762 is DICOM's registered port for TLS)."""
    cert_file: Path
    """PEM certificate chain of the node (its certificate first)."""
    key_file: Path
    """PEM private key (unencrypted), readable by the node's user only (chmod 600)."""
    ca_file: Path | None = None
    """PEM bundle of the CAs whose client certificates are trusted; needed with require_client_cert."""
    require_client_cert: bool = True
    """Refuse a client without a certificate signed by ``ca_file`` (mutual TLS)."""

    @model_validator(mode="after")
    def _ca(self) -> TlsServerSettings:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CAs that sign client certificates)")
        return self


class TlsClientSettings(_Frozen):
    """DICOM TLS towards a dimse destination (``destinations[].tls``)."""

    ca_file: Path | None = None
    """PEM bundle trusted for the destination's certificate; None: the system's trust store. Its
    certificate must name ``host`` (DNS or IP subject alternative name)."""
    cert_file: Path | None = None
    """Our client certificate (PEM chain), for a destination that requires one; with key_file."""
    key_file: Path | None = None
    """Its PEM private key (unencrypted, chmod 600)."""

    @model_validator(mode="after")
    def _pair(self) -> TlsClientSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class NodeSettings(_Frozen):
    ae_title: str = Field("AI-NODE", pattern=AE_TITLE_PATTERN)
    """Our AE title; scanners and PACS send to it."""
    host: str = "0.0.0.0"
    """Address the Storage SCP binds to (``127.0.0.1`` for loopback only)."""
    port: int = Field(11112, ge=1, le=65535)
    storage_dir: Path
    """Spool, catalog and embedded queue live here; must be one local filesystem (atomic rename)."""
    max_associations: int = Field(10, ge=1, le=200)
    acse_timeout_seconds: float = Field(30, gt=0)
    dimse_timeout_seconds: float = Field(30, gt=0)
    network_timeout_seconds: float = Field(60, gt=0)
    maximum_pdu_size: int = Field(0, ge=0)
    """0 = unlimited, the fastest for large images on a LAN."""
    require_called_ae_title: bool = True
    """Reject associations whose Called AE Title is not ``ae_title`` (A-ASSOCIATE-RJ, reason 0x07)."""
    min_free_mb: int = Field(256, ge=0)
    """Below this much free space in storage_dir, C-STORE answers 0xA700 (Out of Resources)."""
    peers: list[Peer] = Field(default_factory=list)
    """The AEs allowed to associate (besides the dimse destinations, which may push: see ``node.peers``)."""
    accept_unknown_peers: bool = False
    """True: a calling AE title not in ``peers`` may associate and echo/store (a known AE title from an
    address outside its ``host`` is still rejected). False: it gets A-ASSOCIATE-RJ (reason 0x03)."""
    plain: bool = True
    """The plain (unencrypted) DIMSE port ``port``; false with ``tls`` to accept DICOM TLS only."""
    tls: TlsServerSettings | None = None
    """A second Storage SCP on ``tls.port`` speaking DICOM TLS (PS3.15 Annex B, BCP 195)."""

    @model_validator(mode="after")
    def _doors(self) -> NodeSettings:
        if not self.plain and self.tls is None:
            raise ValueError("plain: false needs tls (the node would have no DIMSE port)")
        if self.plain and self.tls is not None and self.tls.port == self.port:
            raise ValueError(f"tls.port {self.tls.port} is the plain DIMSE port too")
        return self


class HttpTlsSettings(_Frozen):
    """HTTPS for the HTTP service (``http.tls``): TLS 1.2 or later."""

    cert_file: Path
    """PEM certificate chain (the server's certificate first)."""
    key_file: Path
    """PEM private key, readable by the node's user only."""


JwtAlgorithm = Literal["RS256", "ES256"]
JWT_ALGORITHMS: tuple[JwtAlgorithm, ...] = ("RS256", "ES256")


class OidcSettings(_Frozen):
    """OpenID Connect bearer tokens (``http.oidc``): JWTs signed by the identity provider, verified
    against its JWKS (signature by ``kid``, ``iss``, ``aud``, ``exp``/``nbf``); the roles claim maps to
    node roles through ``role_map``."""

    issuer: str = Field(min_length=1)
    """The ``iss`` a token must carry (exactly)."""
    audience: str = Field(min_length=1)
    """An ``aud`` a token must carry (the node's client id at the provider)."""
    jwks_file: Path | None = None
    """The provider's signing keys (a JWKS document) from a file; or ``jwks_url``."""
    jwks_url: str | None = Field(None, pattern=r"^https?://\S+$")
    """Fetched at start-up and again, at most once a minute, when a token names an unknown ``kid``."""
    ca_file: Path | None = None
    """PEM bundle trusted for an https ``jwks_url``; default: the system's trust store."""
    roles_claim: str = Field("roles", pattern=r"^[A-Za-z0-9_:-]+(\.[A-Za-z0-9_:-]+)*$")
    """Where the token lists its roles: a claim name, or a dotted path (``realm_access.roles``)."""
    role_map: dict[str, Role] = Field(default_factory=dict)
    """Claim value -> node role (viewer, sender, operator, admin); a token with no mapped value gets 403."""
    name_claim: str = "sub"
    """The claim that names the caller (in the audit trail)."""
    algorithms: list[JwtAlgorithm] = Field(default_factory=lambda: list(JWT_ALGORITHMS), min_length=1)
    """Signature algorithms accepted (never ``none`` or HMAC)."""
    leeway_seconds: float = Field(30, ge=0, le=300)
    """Clock skew tolerated on ``exp``, ``nbf`` and ``iat``."""

    @model_validator(mode="after")
    def _one_key_source(self) -> OidcSettings:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("give exactly one of jwks_file and jwks_url")
        return self


class HttpSettings(_Frozen):
    """The node's HTTP service (one ASGI app on uvicorn): DICOMweb under ``/dicom-web`` (STOW-RS,
    QIDO-RS, WADO-RS), the REST API under ``/api/v1``, ``/healthz``, ``/readyz``, ``/metrics``.

    Every route but ``/healthz`` and ``/readyz`` needs a bearer token (``dicom-node token create``)
    or, with ``oidc``, a JWT of the identity provider; with neither, they all answer 401."""

    enabled: bool = True
    host: str = "127.0.0.1"
    """Loopback by default; listen on a LAN address with ``tls`` (tokens travel in every request)."""
    port: int = Field(8080, ge=0, le=65535)
    """0: any free port (tests)."""
    max_request_mb: int = Field(1024, ge=1)
    """A STOW-RS request larger than this gets 413 (parts are streamed to the spool, never held whole)."""
    timeout_seconds: float = Field(60, gt=0)
    """A client that sends nothing for this long is disconnected."""
    tls: HttpTlsSettings | None = None
    """HTTPS (certificate and key files); None: plain HTTP."""
    oidc: OidcSettings | None = None
    """Also accept OpenID Connect JWTs; None: API tokens only."""


class AssemblySettings(_Frozen):
    study_quiet_seconds: float = Field(30, ge=0)
    """A study is ready this long after its last instance arrived."""
    early_settle_seconds: float = Field(2.0, ge=0)
    """Early completion (:mod:`node.completion`): a study that announced its size, or came whole from a
    ``whole_study_per_association`` peer, is ready this long after its last association was released."""
    poll_seconds: float = Field(1.0, gt=0)


class QueueSettings(_Frozen):
    broker_url: str = ""
    """Empty: embedded file-system broker under storage_dir (no server). ``redis://...`` for Redis."""
    worker_concurrency: int = Field(1, ge=1, le=64)
    """Worker processes started by ``dicom-node run`` / ``dicom-node worker``."""
    torch_threads: int | None = Field(None, ge=1, le=256)
    """Threads per worker process for torch, SimpleITK and BLAS/OpenMP; None: ``OMP_NUM_THREADS`` if set,
    else CPUs / worker_concurrency."""
    embedded_workers: bool = True
    """``dicom-node run`` starts its own worker processes (set false when workers run elsewhere)."""
    job_time_limit_seconds: int = Field(1800, ge=10)
    """A job running longer is stopped (and retried); a job 'running' longer than this plus two
    minutes has lost its worker and goes back to the queue."""
    worker_lost_seconds: float = Field(30, ge=10)
    """A running job whose worker's heartbeat (every 5 s) is older than this, and that was claimed longer
    ago, has lost its worker (on any host) and goes back to the queue."""
    job_max_attempts: int = Field(3, ge=1, le=20)
    """Attempts before a job goes to the visible ``failed`` state (dead letter); ``dicom-node retry``."""
    job_retry_initial_seconds: float = Field(30, ge=0)
    job_retry_max_seconds: float = Field(600, ge=0)
    """A failed attempt is retried after initial, 2 x initial, ... up to this cap."""
    poll_seconds: float = Field(0.2, gt=0)
    """Polling interval of the embedded broker."""
    offpeak_window: str = Field("22:00-06:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$")
    """Local time ``HH:MM-HH:MM`` (may span midnight) when ``offpeak`` jobs run; outside it they run
    only while no urgent or normal job waits for their queue."""
    in_flight: dict[str, Annotated[int, Field(ge=1, le=1024)]] = Field(default_factory=dict)
    """Queue -> messages the node keeps sent but not finished (its workers' total concurrency); the
    node picks each next job itself (priority, fair share per study). Unlisted: ``worker_concurrency``."""


class SendSettings(_Frozen):
    retry_initial_seconds: float = Field(10, gt=0)
    retry_max_seconds: float = Field(600, gt=0)
    """Backoff doubles from initial up to this cap; deliveries are retried, never dropped."""
    poll_seconds: float = Field(1.0, gt=0)
    association_timeout_seconds: float = Field(30, gt=0)
    """DIMSE association/response timeout; for DICOMweb destinations the HTTP connect/read timeout."""


class DimseDestination(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    type: Literal["dimse"]
    ae_title: str = Field(pattern=AE_TITLE_PATTERN)
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = Field(None, pattern=AE_TITLE_PATTERN)
    """Defaults to ``node.ae_title``."""
    tls: TlsClientSettings | None = None
    """Associate over DICOM TLS (C-STORE, and C-FIND/C-MOVE/C-GET when it is ``priors.source``)."""


class DicomwebDestination(_Frozen):
    """A DICOMweb service that takes results by STOW-RS (``POST {url}/studies``).

    Secrets never sit in the YAML: basic-auth passwords and bearer tokens are read from files
    (``password_file``, ``token_file``) each time a batch is sent, so a rotated token is picked up.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    type: Literal["dicomweb"]
    url: str = Field(pattern=r"^https?://[^\s/]+(/\S*)?$")
    """Base URL of the service, the part before ``/studies``, e.g. ``http://pacs:8042/dicom-web``."""
    username: str | None = None
    """HTTP basic authentication user; needs ``password_file``."""
    password_file: Path | None = None
    token_file: Path | None = None
    """HTTP bearer token (``Authorization: Bearer ...``), the file's content stripped of whitespace."""
    ca_file: Path | None = None
    """PEM bundle trusted for an https ``url``; default: the system's trust store."""
    accepts_labelmap: bool = False
    """STOW-RS has no negotiation: set True when the service stores Label Map Segmentation
    (1.2.840.10008.5.1.4.1.1.66.7); otherwise the BINARY variant of each SEG is sent."""
    max_request_mb: float = Field(64, gt=0)
    """Files are batched into multipart requests of at most this size (one file may exceed it)."""

    @model_validator(mode="after")
    def _auth(self) -> DicomwebDestination:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together (HTTP basic authentication)")
        if self.username is not None and self.token_file is not None:
            raise ValueError("choose basic authentication (username) or a bearer token (token_file), not both")
        return self


Destination = Annotated[DimseDestination | DicomwebDestination, Field(discriminator="type")]


class PriorSettings(_Frozen):
    """Prior studies from a PACS for registration models (``priors:``; absent = the catalog only).

    When a study is routed to a registration model and the catalog holds no earlier study of that
    patient with that modality, the node C-FINDs the patient's most recent earlier study at
    ``source`` and retrieves it before the job is queued (``node.retrieve``).
    """

    source: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Name of a ``destinations`` entry (type dimse): the PACS queried and retrieved from (its AE
    title, host, port and calling AE title)."""
    method: Literal["move", "get"] = "move"
    """``move``: C-MOVE to ``node.ae_title`` (the PACS must know the node's AE title, host and port);
    ``get``: C-GET over the query association (no inbound connection needed)."""
    max_age_days: int | None = Field(None, ge=1)
    """Only studies at most this many days older than the current one; None = any age."""
    timeout_seconds: float = Field(300, gt=0)
    """Cap on one retrieval (C-FIND + C-MOVE/C-GET); the study is routed without the prior after it."""


class RegexMatch(_Frozen):
    regex: str

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from exc
        return v


class RangeMatch(_Frozen):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounded(self) -> RangeMatch:
        if self.min is None and self.max is None:
            raise ValueError("a range needs min and/or max")
        return self


MatchValue = str | int | float | list[str | int | float] | RegexMatch | RangeMatch


class Rule(_Frozen):
    name: str
    match: dict[str, MatchValue] = Field(default_factory=dict)
    """Attribute -> value (equal, case-insensitive), list (any of), {regex}, or {min, max}."""
    models: list[str] = Field(min_length=1)
    send_to: list[str] = Field(default_factory=list)
    priority: Literal["urgent", "normal", "offpeak"] = "normal"
    """Its jobs' priority: ``urgent`` overtakes waiting ``normal`` jobs; ``offpeak`` waits for
    ``queue.offpeak_window`` (or an idle queue)."""

    @field_validator("match")
    @classmethod
    def _known_attributes(cls, v: dict[str, MatchValue]) -> dict[str, MatchValue]:
        unknown = sorted(set(v) - set(MATCHABLE_ATTRIBUTES))
        if unknown:
            raise ValueError(f"cannot match on {unknown}; known: {', '.join(MATCHABLE_ATTRIBUTES)}")
        return v


class AuditSyslogSettings(_Frozen):
    """A copy of each audit record to a syslog collector (RFC 5424; the record's JSON is the MSG).

    Sent from a bounded queue by a background thread: a collector that is down never blocks or breaks
    the node; when the queue is full records are dropped from syslog (counted and logged), never from
    the audit file."""

    host: str = Field(min_length=1)
    port: int | None = Field(None, ge=1, le=65535)
    """None: 514 (udp), 601 (tcp), 6514 (tls)."""
    protocol: Literal["udp", "tcp", "tls"] = "tls"
    """``udp``: one datagram per record (RFC 5426); ``tcp`` / ``tls``: octet-counting framing (RFC 5425)."""
    ca_file: Path | None = None
    """PEM bundle trusted for the collector's certificate (tls); default: the system's trust store."""
    cert_file: Path | None = None
    """Our client certificate (PEM) when the collector requires mutual TLS."""
    key_file: Path | None = None
    facility: int | str = 10
    """0-23 or a name (``authpriv`` = 10, the default; ``security`` = 13, ``local0``..``local7``)."""
    queue_size: int = Field(10000, ge=1)
    """Records waiting for the collector before further ones are dropped."""

    @field_validator("facility")
    @classmethod
    def _facility(cls, v: int | str) -> int | str:
        facility_number(v)  # raises ValueError for an unknown one
        return v


class AuditSettings(_Frozen):
    """The audit trail (``node.audit``): ``<storage_dir>/audit/audit.log``, one JSON record per line,
    rotated by size."""

    enabled: bool = True
    max_mb: float = Field(10, gt=0)
    """The file is rotated (``audit.log.1``, ...) when it would grow past this."""
    keep: int = Field(10, ge=1, le=1000)
    """Rotated files kept; older ones are deleted."""
    fsync: bool = False
    """fsync every record (survives a power loss). Off: each record is written to the OS at once
    (survives a crash of the node) and fsynced at rotation and shutdown."""
    site_id: str | None = None
    """AuditEnterpriseSiteID of every record (the hospital or site)."""
    syslog: AuditSyslogSettings | None = None


class LoggingSettings(_Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Settings(_Frozen):
    node: NodeSettings
    http: HttpSettings = Field(default_factory=HttpSettings)
    assembly: AssemblySettings = Field(default_factory=AssemblySettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    send: SendSettings = Field(default_factory=SendSettings)
    destinations: list[Destination] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=list)
    models: dict[str, ModelSettings] = Field(default_factory=dict)
    priors: PriorSettings | None = None
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    notifications: NotificationSettings = Field(default_factory=NotificationSettings)
    catalog: CatalogSettings = Field(default_factory=CatalogSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    remote: RemoteSettings | None = None
    """This host runs remote workers: jobs through the node's worker API, never the catalog or spool."""
    remote_workers: RemoteWorkersSettings = Field(default_factory=RemoteWorkersSettings)

    @model_validator(mode="before")
    @classmethod
    def _moved_sections(cls, data: Any) -> Any:
        if isinstance(data, dict) and "stow" in data:
            raise ValueError("stow: the STOW-RS door is part of the HTTP service now: use http.enabled, http.host, "
                             "http.port, http.max_request_mb and http.timeout_seconds (STOW-RS is served at "
                             "/dicom-web/studies)")
        return data

    @model_validator(mode="after")
    def _references(self) -> Settings:
        if self.remote is not None and not self.queue.broker_url:
            raise ValueError("remote: remote workers need queue.broker_url (the embedded broker is a directory "
                             "on the node's host)")
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destinations: duplicate names {dupes}")
        for rule in self.rules:
            missing = [n for n in rule.send_to if n not in names]
            if missing:
                raise ValueError(f"rules[{rule.name}].send_to: unknown destinations {missing}")
        if self.priors is not None:
            if self.priors.source not in names:
                raise ValueError(f"priors.source: unknown destination {self.priors.source!r}")
            if not isinstance(self.destination(self.priors.source), DimseDestination):
                raise ValueError(f"priors.source: {self.priors.source!r} must be a dimse destination "
                                 "(priors are found by C-FIND and retrieved by C-MOVE/C-GET)")
        return self

    def destination(self, name: str) -> DimseDestination | DicomwebDestination:
        for d in self.destinations:
            if d.name == name:
                return d
        raise KeyError(name)

    def model_settings(self, name: str) -> ModelSettings:
        return self.models.get(name) or ModelSettings()

    @property
    def embedded_broker(self) -> bool:
        return not self.queue.broker_url


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {'.'.join(path[:-1])} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


SECRET_MODE_MASK = 0o077
"""Permission bits a private key or secret file must not have (group or others may not touch it)."""


def check_readable_file(key: str, path: Path) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``path`` is a regular file this process can read."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{key}: {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{key}: cannot read {path}: permission denied")


def check_secret_file(key: str, path: Path, *, must_exist: bool = True) -> None:
    """Refuse a private key or secret file (``key`` names the setting, e.g. ``node.tls.key_file``) that
    group or others may read or write: :class:`ConfigError` naming the key and the file, suggesting
    ``chmod 600``. ``must_exist=False``: a missing file passes (it is read later, e.g. at each send)."""
    if not must_exist and not path.exists():
        return
    check_readable_file(key, path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & SECRET_MODE_MASK:
        raise ConfigError(f"{key}: {path} is readable by group or others (mode {mode:04o}); "
                          f"make it private to the node's user: chmod 600 {path}")


def check_files(settings: Settings) -> None:
    """The files the node process reads: TLS certificates, keys and CA bundles exist and are readable,
    private keys and secret files are private (:func:`check_secret_file`). Run by ``dicom-node run`` and
    ``check-config`` (not by workers, which never read them); raises :class:`ConfigError`."""
    n = settings.node
    if n.tls is not None:
        check_readable_file("node.tls.cert_file", n.tls.cert_file)
        check_secret_file("node.tls.key_file", n.tls.key_file)
        if n.tls.ca_file is not None:
            check_readable_file("node.tls.ca_file", n.tls.ca_file)
    for d in settings.destinations:
        where = f"destinations[{d.name}]"
        if isinstance(d, DimseDestination) and d.tls is not None:
            if d.tls.ca_file is not None:
                check_readable_file(f"{where}.tls.ca_file", d.tls.ca_file)
            if d.tls.cert_file is not None and d.tls.key_file is not None:
                check_readable_file(f"{where}.tls.cert_file", d.tls.cert_file)
                check_secret_file(f"{where}.tls.key_file", d.tls.key_file)
        elif isinstance(d, DicomwebDestination):
            for key, path in (("password_file", d.password_file), ("token_file", d.token_file)):
                if path is not None:  # read at each send: a missing one is check-config's "cannot read"
                    check_secret_file(f"{where}.{key}", path, must_exist=False)
    h = settings.http
    if h.tls is not None:
        check_readable_file("http.tls.cert_file", h.tls.cert_file)
        check_secret_file("http.tls.key_file", h.tls.key_file)
    if h.oidc is not None:
        for key, path in (("jwks_file", h.oidc.jwks_file), ("ca_file", h.oidc.ca_file)):
            if path is not None:
                check_readable_file(f"http.oidc.{key}", path)
    for key, path, secret in settings.notifications.files():
        (check_secret_file if secret else check_readable_file)(key, path)


def parse_settings(data: Mapping[str, Any], source: str = "<settings>") -> Settings:
    """Validate a mapping (already merged with the environment) into ``Settings``."""
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def load_settings(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, merge with ``DICOM_NODE__*`` environment overrides, and validate."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    data = _apply_env(raw, os.environ if environ is None else environ)
    settings = parse_settings(data, str(path))
    if not settings.node.storage_dir.is_absolute():
        storage = (path.parent / settings.node.storage_dir).resolve()
        settings = settings.model_copy(
            update={"node": settings.node.model_copy(update={"storage_dir": storage})}
        )
    return settings
