"""The audit trail: who did what with which study, when, from where.

Records are shaped after the DICOM audit message schema (PS3.15 A.5, in the lineage of RFC 3881):
EventIdentification (EventID, EventActionCode, EventDateTime, EventOutcomeIndicator, EventTypeCode),
ActiveParticipant (UserID: an AE title or a token's name; NetworkAccessPointID: the address;
UserIsRequestor), AuditSourceIdentification (this node) and ParticipantObjectIdentification (Study
Instance UIDs, type code 110180, with instance counts per SOP Class). The element names are the
schema's; the encoding is JSON, one record per line, instead of XML. No record carries a patient's
name, ID or birth date: studies are named by UID, queries by the keys they match on (never the values).

Events (EventID, DCM codes) and where they come from (wired by :mod:`node.service` through the
stages' typed hooks; no stage imports this module):

    110100 Application Activity     node start (110120) / stop (110121); API actions (retry, rerun,
                                    pause, resume) by whom, with a local EventTypeCode (99DCMNODE)
    110114 User Authentication      association accepted (110122 Login; the calling AE and address);
                                    HTTP 401 (outcome 4)
    110113 Security Alert           association rejected, TLS handshake failed (110126 Node
                                    Authentication); HTTP 403 (110132 Use of Restricted Function)
    110104 DICOM Instances Transferred  in: per association / per STOW-RS request (action C); out: per
                                    delivery batch to a destination (C); WADO-RS retrieves (R)
    110103 DICOM Instances Accessed  ``GET /api/v1/studies/{id}/dicom`` (patient attributes, R)
    110112 Query                    QIDO-RS requests; the node's C-FIND to the PACS for priors
    110102 Begin Transferring DICOM Instances  the node's C-MOVE / C-GET of a prior

Association events: PS3.15's 110108 Network Entry means a node attaching to or detaching from the
network (event types Attach/Detach), not a connection. An association is a peer identifying itself
(AE title, address, certificate) to the node, so an accepted one is a 110114 User Authentication
(Login) of that node, and a refused one a 110113 Security Alert (Node Authentication, outcome 4).

The file: ``<storage_dir>/audit/audit.log``, append-only, rotated by size (``audit.max_mb``) into
``audit.log.1`` .. ``audit.log.<keep>``. Each record is written and flushed to the OS at once (it
survives a crash of the node); ``audit.fsync: true`` also fsyncs each record (survives a power loss,
costs a disk flush per record), off by default. A copy goes to syslog when ``audit.syslog`` is set
(:mod:`node.syslog`: RFC 5424, never blocking the node). Writing the trail never breaks the node: a
failing write is logged and counted.
"""

from __future__ import annotations

import datetime as dt
import getpass
import ipaddress
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from models.errors import ConfigError
from node.config import DicomwebDestination, Settings
from node.conformance import STUDY_ROOT_FIND
from node.syslog import SEVERITY_NOTICE, SEVERITY_WARNING, SyslogSender, facility_number

if TYPE_CHECKING:
    from node.http.audit import HttpAudited
    from node.receive.scp import AssociationEvent, InstancesReceived
    from node.retrieve import PriorExchange
    from node.send.deliver import DeliveryBatch

log = logging.getLogger("node.audit")

AUDIT_DIR = "audit"
AUDIT_FILE = "audit.log"
LOCAL = "99DCMNODE"
"""Coding scheme of this node's own codes (DICOM's ``99`` prefix for private schemes)."""

Action = Literal["C", "R", "U", "D", "E"]
Outcome = Literal[0, 4, 8, 12]
SUCCESS: Outcome = 0
MINOR_FAILURE: Outcome = 4
SERIOUS_FAILURE: Outcome = 8
MAJOR_FAILURE: Outcome = 12


@dataclass(frozen=True)
class Code:
    """A coded value (csd-code, codeSystemName, originalText)."""

    code: str
    display: str
    system: str = "DCM"

    def to_json(self) -> dict[str, str]:
        return {"csd-code": self.code, "codeSystemName": self.system, "originalText": self.display}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Code:
        return cls(str(d["csd-code"]), str(d.get("originalText", "")), str(d.get("codeSystemName", "DCM")))


# EventID (CID 400)
APPLICATION_ACTIVITY = Code("110100", "Application Activity")
BEGIN_TRANSFERRING = Code("110102", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED = Code("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
QUERY = Code("110112", "Query")
SECURITY_ALERT = Code("110113", "Security Alert")
USER_AUTHENTICATION = Code("110114", "User Authentication")
# EventTypeCode (CID 401)
APPLICATION_START = Code("110120", "Application Start")
APPLICATION_STOP = Code("110121", "Application Stop")
LOGIN = Code("110122", "Login")
NODE_AUTHENTICATION = Code("110126", "Node Authentication")
RESTRICTED_FUNCTION = Code("110132", "Use of Restricted Function")
# RoleIDCode (CID 402)
APPLICATION = Code("110150", "Application")
APPLICATION_LAUNCHER = Code("110151", "Application Launcher")
DESTINATION = Code("110152", "Destination Role ID")
SOURCE = Code("110153", "Source Role ID")
# ParticipantObjectIDTypeCode (CID 404)
STUDY_UID = Code("110180", "Study Instance UID")
SOP_CLASS_UID = Code("110181", "SOP Class UID")

EVENT_NAMES: dict[str, str] = {
    APPLICATION_ACTIVITY.code: "application-activity",
    BEGIN_TRANSFERRING.code: "begin-transferring",
    INSTANCES_ACCESSED.code: "instances-accessed",
    INSTANCES_TRANSFERRED.code: "instances-transferred",
    QUERY.code: "query",
    SECURITY_ALERT.code: "security-alert",
    USER_AUTHENTICATION.code: "user-authentication",
}
"""Short names of the EventIDs this node records (``dicom-node audit --event NAME``)."""


def _nap_type(address: str) -> int:
    """NetworkAccessPointTypeCode: 2 for an IP address, 1 for a machine name."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return 1
    return 2


@dataclass(frozen=True)
class ActiveParticipant:
    user_id: str
    """An AE title, a token or user name, a process."""
    is_requestor: bool
    network_access_point: str | None = None
    """An IP address or host name."""
    roles: tuple[Code, ...] = ()
    alternative_user_id: str | None = None
    user_name: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"UserID": self.user_id}
        if self.alternative_user_id:
            out["AlternativeUserID"] = self.alternative_user_id
        if self.user_name:
            out["UserName"] = self.user_name
        out["UserIsRequestor"] = self.is_requestor
        if self.roles:
            out["RoleIDCode"] = [r.to_json() for r in self.roles]
        if self.network_access_point:
            out["NetworkAccessPointTypeCode"] = _nap_type(self.network_access_point)
            out["NetworkAccessPointID"] = self.network_access_point
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ActiveParticipant:
        return cls(str(d["UserID"]), bool(d.get("UserIsRequestor")), d.get("NetworkAccessPointID"),
                   tuple(Code.from_json(r) for r in d.get("RoleIDCode", ())), d.get("AlternativeUserID"),
                   d.get("UserName"))


@dataclass(frozen=True)
class ParticipantObject:
    object_id: str
    id_type: Code
    type_code: int = 2
    """1 person, 2 system object, 3 organization, 4 other."""
    role: int | None = 3
    """ParticipantObjectTypeCodeRole: 3 report (a study), 24 query, ..."""
    instances: int | None = None
    """NumberOfInstances (a study's instances in this event)."""
    sop_classes: tuple[tuple[str, int], ...] = ()
    """(SOP Class UID, number of instances)."""
    details: tuple[tuple[str, str], ...] = ()
    """ParticipantObjectDetail type/value pairs (plain text: never tag values of a patient)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ParticipantObjectID": self.object_id, "ParticipantObjectTypeCode": self.type_code}
        if self.role is not None:
            out["ParticipantObjectTypeCodeRole"] = self.role
        out["ParticipantObjectIDTypeCode"] = self.id_type.to_json()
        description: dict[str, Any] = {}
        if self.instances is not None:
            description["NumberOfInstances"] = self.instances
        if self.sop_classes:
            description["SOPClass"] = [{"UID": uid, "NumberOfInstances": n} for uid, n in self.sop_classes]
        if description:
            out["ParticipantObjectDescription"] = description
        if self.details:
            out["ParticipantObjectDetail"] = [{"type": t, "value": v} for t, v in self.details]
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ParticipantObject:
        desc = d.get("ParticipantObjectDescription", {})
        return cls(str(d["ParticipantObjectID"]), Code.from_json(d["ParticipantObjectIDTypeCode"]),
                   int(d.get("ParticipantObjectTypeCode", 2)), d.get("ParticipantObjectTypeCodeRole"),
                   desc.get("NumberOfInstances"),
                   tuple((str(c["UID"]), int(c["NumberOfInstances"])) for c in desc.get("SOPClass", ())),
                   tuple((str(x["type"]), str(x["value"])) for x in d.get("ParticipantObjectDetail", ())))


@dataclass(frozen=True)
class AuditSource:
    source_id: str
    """The node's AE title."""
    site_id: str | None = None
    type_code: int = 4
    """AuditSourceTypeCode 4: application server process."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"AuditSourceID": self.source_id}
        if self.site_id:
            out["AuditEnterpriseSiteID"] = self.site_id
        out["AuditSourceTypeCode"] = self.type_code
        return out


@dataclass(frozen=True)
class AuditRecord:
    event_id: Code
    action: Action
    outcome: Outcome
    date_time: dt.datetime
    """Timezone-aware (written in UTC)."""
    source: AuditSource
    participants: tuple[ActiveParticipant, ...]
    objects: tuple[ParticipantObject, ...] = ()
    event_types: tuple[Code, ...] = ()
    outcome_description: str | None = None

    @property
    def name(self) -> str:
        """The short event name (``instances-transferred``)."""
        return EVENT_NAMES.get(self.event_id.code, self.event_id.code)

    def to_json(self) -> dict[str, Any]:
        event: dict[str, Any] = {
            "EventID": self.event_id.to_json(),
            "EventActionCode": self.action,
            "EventDateTime": self.date_time.astimezone(dt.UTC).isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": self.outcome,
        }
        if self.event_types:
            event["EventTypeCode"] = [c.to_json() for c in self.event_types]
        if self.outcome_description:
            event["EventOutcomeDescription"] = self.outcome_description
        out: dict[str, Any] = {
            "EventIdentification": event,
            "ActiveParticipant": [p.to_json() for p in self.participants],
            "AuditSourceIdentification": self.source.to_json(),
        }
        if self.objects:
            out["ParticipantObjectIdentification"] = [o.to_json() for o in self.objects]
        return out

    def line(self) -> str:
        """The record as one line of JSON (no newline)."""
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> AuditRecord:
        event = d["EventIdentification"]
        src = d.get("AuditSourceIdentification", {})
        return cls(
            Code.from_json(event["EventID"]), event["EventActionCode"], event["EventOutcomeIndicator"],
            dt.datetime.fromisoformat(event["EventDateTime"]),
            AuditSource(str(src.get("AuditSourceID", "")), src.get("AuditEnterpriseSiteID"),
                        int(src.get("AuditSourceTypeCode", 4))),
            tuple(ActiveParticipant.from_json(p) for p in d.get("ActiveParticipant", ())),
            tuple(ParticipantObject.from_json(o) for o in d.get("ParticipantObjectIdentification", ())),
            tuple(Code.from_json(c) for c in event.get("EventTypeCode", ())),
            event.get("EventOutcomeDescription"),
        )


def study_objects(studies: Mapping[str, Mapping[str, int]]) -> tuple[ParticipantObject, ...]:
    """One participant object per study: Study Instance UID, its instances per SOP Class."""
    return tuple(ParticipantObject(uid, STUDY_UID, instances=sum(by_class.values()),
                                   sop_classes=tuple(sorted((c, n) for c, n in by_class.items() if c)))
                 for uid, by_class in sorted(studies.items()))


def outcome_of(stored: int, failed: int) -> Outcome:
    """0 all went, 4 some failed, 8 none went."""
    if not failed:
        return SUCCESS
    return MINOR_FAILURE if stored else SERIOUS_FAILURE


def http_outcome(status: int) -> Outcome:
    if status < 400:
        return SUCCESS
    return MINOR_FAILURE if status < 500 else SERIOUS_FAILURE


# ---- the file -----------------------------------------------------------------------------------
class AuditFile:
    """Append-only lines in ``path``, rotated by size into ``path.1`` (newest) .. ``path.<keep>``."""

    def __init__(self, path: Path, max_bytes: int, keep: int, *, fsync: bool = False) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.fsync = fsync
        self._fd: int | None = None
        self._size = 0
        self._lock = threading.Lock()

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def _rotate(self) -> None:
        self._close()
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def append(self, line: str) -> None:
        data = (line.rstrip("\n") + "\n").encode("utf-8")
        with self._lock:
            fd = self._open()
            if self._size and self._size + len(data) > self.max_bytes:
                os.fsync(fd)
                self._rotate()
                fd = self._open()
            written = os.write(fd, data)  # O_APPEND: one write per line, whole lines for a reader
            while written < len(data):
                written += os.write(fd, data[written:])
            self._size += len(data)
            if self.fsync:
                os.fsync(fd)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)
            self._close()


def audit_dir(settings: Settings) -> Path:
    return settings.node.storage_dir / AUDIT_DIR


def audit_files(directory: Path) -> list[Path]:
    """The audit files oldest first: ``audit.log.<n>`` .. ``audit.log.1``, ``audit.log``."""
    rotated = []
    for p in directory.glob(f"{AUDIT_FILE}.*"):
        suffix = p.name[len(AUDIT_FILE) + 1:]
        if suffix.isdigit():
            rotated.append((int(suffix), p))
    current = directory / AUDIT_FILE
    return [p for _, p in sorted(rotated, reverse=True)] + ([current] if current.exists() else [])


# ---- the trail: records from the stages' events -------------------------------------------------
class AuditTrail:
    """Turns the node's events into records; writes each to the file and, when configured, syslog."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time, *,
                 syslog: SyslogSender | None = None) -> None:
        self.settings = settings
        self.clock = clock
        a = settings.audit
        self.file = AuditFile(audit_dir(settings) / AUDIT_FILE, int(a.max_mb * 1024 * 1024), a.keep, fsync=a.fsync)
        self.syslog = syslog
        self.source = AuditSource(settings.node.ae_title, a.site_id)
        self.failures = 0
        """Records that could not be written to the file (logged)."""

    @classmethod
    def from_settings(cls, settings: Settings, clock: Callable[[], float] = time.time) -> AuditTrail:
        s = settings.audit.syslog
        sender = None
        if s is not None:
            try:
                sender = SyslogSender(s.host, s.port or {"udp": 514, "tcp": 601, "tls": 6514}[s.protocol], s.protocol,
                                      facility=facility_number(s.facility), ca_file=s.ca_file, cert_file=s.cert_file,
                                      key_file=s.key_file, queue_size=s.queue_size)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise ConfigError(f"audit.syslog: cannot use the TLS files: {exc}") from None
        return cls(settings, clock, syslog=sender)

    def record(self, rec: AuditRecord) -> None:
        """Append one record (and queue it for syslog); never raises."""
        line = rec.line()
        try:
            self.file.append(line)
        except OSError as exc:
            self.failures += 1
            log.error("audit: cannot write %s: %s", self.file.path, exc.strerror or type(exc).__name__)
        if self.syslog is not None:
            self.syslog.send(line, SEVERITY_NOTICE if rec.outcome == SUCCESS else SEVERITY_WARNING,
                             rec.date_time.timestamp())

    def close(self) -> None:
        if self.syslog is not None:
            self.syslog.close()
        try:
            self.file.close()
        except OSError as exc:
            log.error("audit: cannot close %s: %s", self.file.path, exc.strerror or type(exc).__name__)

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    def _emit(self, event_id: Code, action: Action, outcome: Outcome, participants: Iterable[ActiveParticipant],
              objects: Iterable[ParticipantObject] = (), event_types: Iterable[Code] = (),
              description: str | None = None) -> None:
        try:
            rec = AuditRecord(event_id, action, outcome, self._now(), self.source, tuple(participants),
                              tuple(objects), tuple(event_types), description)
        except Exception:  # a bad event must not break the stage that reported it
            log.exception("audit: cannot build a %s record", event_id.display)
            return
        self.record(rec)

    def _node(self, *, requestor: bool, roles: tuple[Code, ...] = (), ae: str | None = None) -> ActiveParticipant:
        return ActiveParticipant(ae or self.settings.node.ae_title, requestor, None, roles,
                                 alternative_user_id=str(os.getpid()))

    def _guard(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # the trail never breaks the node: the hook's caller is a stage
            log.exception("audit: cannot record %s", what)

    # -- application
    def application_started(self) -> None:
        self._application(APPLICATION_START)

    def application_stopped(self) -> None:
        self._application(APPLICATION_STOP)

    def _application(self, kind: Code) -> None:
        try:
            launcher = getpass.getuser()
        except Exception:  # no user name (a container without passwd entry)
            launcher = str(os.getuid())
        self._emit(APPLICATION_ACTIVITY, "E", SUCCESS,
                   (self._node(requestor=False, roles=(APPLICATION,)),
                    ActiveParticipant(launcher, True, roles=(APPLICATION_LAUNCHER,))), event_types=(kind,))

    # -- DIMSE associations
    def association(self, event: AssociationEvent) -> None:
        self._guard("an association", lambda: self._association(event))

    def _association(self, event: AssociationEvent) -> None:
        peer = ActiveParticipant(event.calling_ae.strip() or event.address or "-", True, event.address or None)
        node = self._node(requestor=False, roles=(APPLICATION,), ae=(event.called_ae or "").strip() or None)
        over = " over TLS" if event.tls else ""
        if event.accepted:
            allow = f" (allowed: {', '.join(sorted(event.allow))})" if event.allow else ""
            self._emit(USER_AUTHENTICATION, "E", SUCCESS, (peer, node), event_types=(LOGIN,),
                       description=f"DICOM association accepted{over}{allow}")
        else:
            self._emit(SECURITY_ALERT, "E", MINOR_FAILURE, (peer, node), event_types=(NODE_AUTHENTICATION,),
                       description=f"DICOM association rejected{over}: {event.reason or 'no reason given'}")

    # -- instances in (an association, a STOW-RS request)
    def instances_received(self, event: InstancesReceived) -> None:
        self._guard("instances received", lambda: self._instances_received(event))

    def _instances_received(self, event: InstancesReceived) -> None:
        stored = sum(n for by_class in event.studies.values() for n in by_class.values())
        if not stored and not event.failed:
            return
        door = "C-STORE" if event.door == "dimse" else "STOW-RS"
        source = ActiveParticipant(event.source or "-", True, event.address or None, (SOURCE,),
                                   alternative_user_id=event.kind)
        self._emit(INSTANCES_TRANSFERRED, "C", outcome_of(stored, event.failed),
                   (source, self._node(requestor=False, roles=(DESTINATION,))), study_objects(event.studies),
                   description=f"{door}: {stored} stored, {event.failed} failed")

    # -- instances out (a delivery batch)
    def delivered(self, event: DeliveryBatch) -> None:
        self._guard("a delivery", lambda: self._delivered(event))

    def _delivered(self, event: DeliveryBatch) -> None:
        sent = sum(n for by_class in event.studies.values() for n in by_class.values())
        destination, calling = self._peer(event.destination, DESTINATION)
        text = f"to {event.destination}: {sent} sent, {event.failed} failed"
        if event.error:
            text += f" ({event.error[:200]})"
        self._emit(INSTANCES_TRANSFERRED, "C", outcome_of(sent, event.failed),
                   (self._node(requestor=True, roles=(SOURCE,), ae=calling), destination),
                   study_objects(event.studies), description=text)

    # -- priors from the PACS
    def prior_exchange(self, event: PriorExchange) -> None:
        self._guard("a prior retrieval", lambda: self._prior_exchange(event))

    def _peer(self, name: str, role: Code) -> tuple[ActiveParticipant, str | None]:
        """A ``destinations`` entry as a participant (its AE title or URL, host), and our calling AE
        title towards it."""
        try:
            d = self.settings.destination(name)
        except KeyError:
            return ActiveParticipant(name, False, None, (role,), user_name=name), None
        if isinstance(d, DicomwebDestination):
            host = urlsplit(d.url).hostname
            return ActiveParticipant(d.url, False, host, (role,), user_name=name), None
        return ActiveParticipant(d.ae_title, False, d.host, (role,), user_name=name), d.calling_ae_title

    def _prior_exchange(self, event: PriorExchange) -> None:
        pacs, calling = self._peer(event.source, SOURCE)
        node = self._node(requestor=True, roles=(DESTINATION,), ae=calling)
        if event.error:
            outcome: Outcome = SERIOUS_FAILURE
        else:
            outcome = MINOR_FAILURE if event.failed else SUCCESS
        note = f": {event.error}" if event.error else ""
        if event.operation == "find":
            query = ParticipantObject(STUDY_ROOT_FIND, SOP_CLASS_UID, role=24,
                                      details=(("QueryRetrieveLevel", event.level),
                                               ("QueryKeys", ",".join(event.keys))))
            searched = (ParticipantObject(event.study_uid, STUDY_UID),) if event.study_uid else ()
            self._emit(QUERY, "E", outcome, (node, pacs), (query, *searched),
                       description=f"C-FIND ({event.level}) for a prior: {event.count} match(es){note}")
            return
        study = {event.study_uid: {"": event.count}} if event.study_uid else {}
        op = f"C-{event.operation.upper()}"
        self._emit(BEGIN_TRANSFERRING, "E", outcome, (node, pacs), study_objects(study),
                   description=f"{op} of a prior: {event.count} completed, {event.failed} failed{note}")
        if event.operation == "get" and (event.count or event.failed):  # C-GET: the instances came on this association
            self._emit(INSTANCES_TRANSFERRED, "C", outcome_of(event.count, event.failed), (pacs, node),
                       study_objects(study), description=f"C-GET: {event.count} stored, {event.failed} failed")

    # -- HTTP (the audit middleware of node.http)
    def http(self, event: HttpAudited) -> None:
        self._guard("an HTTP request", lambda: self._http(event))

    def _http(self, event: HttpAudited) -> None:
        who = event.requestor
        roles = (Code(who.role, who.role, f"{LOCAL}-ROLE"),) if who.role else ()
        requestor = ActiveParticipant(who.name or "anonymous", True, who.address, roles, alternative_user_id=who.kind)
        node = self._node(requestor=False, roles=(APPLICATION,))
        text = f"{event.method} {event.route} -> {event.status}"
        outcome = http_outcome(event.status)
        studies = tuple(ParticipantObject(uid, STUDY_UID) for uid in event.study_uids)
        if event.kind == "unauthenticated":
            self._emit(USER_AUTHENTICATION, "E", MINOR_FAILURE, (requestor, node), event_types=(LOGIN,),
                       description=text)
        elif event.kind == "forbidden":
            self._emit(SECURITY_ALERT, "E", MINOR_FAILURE, (requestor, node), event_types=(RESTRICTED_FUNCTION,),
                       description=text)
        elif event.kind == "query":
            query = ParticipantObject(STUDY_ROOT_FIND, SOP_CLASS_UID, role=24,
                                      details=(("QueryRetrieveLevel", event.level or ""),
                                               ("QueryKeys", ",".join(event.query_keys))))
            self._emit(QUERY, "E", outcome, (requestor, node), (query, *studies), description=f"QIDO-RS {text}")
        elif event.kind == "retrieve":
            self._emit(INSTANCES_TRANSFERRED, "R", outcome,
                       (ActiveParticipant(requestor.user_id, True, who.address, (*roles, DESTINATION),
                                          alternative_user_id=who.kind),
                        self._node(requestor=False, roles=(SOURCE,))), studies, description=f"WADO-RS {text}")
        elif event.kind == "access":
            self._emit(INSTANCES_ACCESSED, "R", outcome, (requestor, node), studies, description=text)
        elif event.kind == "action":
            action = Code(event.action or "api-action", (event.action or "api-action").replace("-", " "), LOCAL)
            target = () if event.target is None else (
                ParticipantObject(event.target[1], Code(event.target[0], event.target[0], LOCAL), role=None),)
            self._emit(APPLICATION_ACTIVITY, "U" if "destination" in (event.action or "") else "E", outcome,
                       (requestor, node), (*studies, *target), event_types=(action,), description=text)
