"""Storage SCP: validate -> spool -> catalog -> status. Nothing else happens here.

Success (0x0000) is answered only after the file is fsynced and renamed into the spool and its
catalog row committed. Failures get the DICOM status a sending modality understands:

    0xA700  Out of Resources    the spool or catalog could not store it (disk full, below floor)
    0xA900  Data Set does not match SOP Class   UIDs in the data set differ from the request
    0xC210  Cannot understand   the data set could not be parsed
    0xC211  Cannot understand   required identifiers missing/invalid, or Pixel Data truncated
    0x0122  SOP Class not supported   (STOW-RS only; DIMSE negotiation refuses it earlier)
    0x0124  Refused: Not Authorized   the peer may associate but not store (``node.peers[].allow``)

Who may associate at all is decided on the A-ASSOCIATE-RQ (:mod:`node.peers`): an unknown calling AE
title, a known one from an address outside its ``host``, or a called AE title other than ours gets an
A-ASSOCIATE-RJ (rejected-permanent, service-user, reason 0x03 or 0x07) before any data set is read.
With ``node.tls`` a second server speaks DICOM TLS on its own port (:mod:`node.tls`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import socket
import ssl
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import ThreadedAssociationServer

from node.catalog import Catalog
from node.completion import Announced, announced_by
from node.config import Settings
from node.conformance import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, VERIFICATION_SOP_CLASS
from node.dicomweb.attributes import indexed_attributes
from node.logutil import ref
from node.nodelay import NODELAY_HANDLERS
from node.peers import PeerTable
from node.spool import Spool, StorageError, Stored, is_valid_uid
from node.tls import server_context

log = logging.getLogger("node.receive")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_MISMATCH = 0xA900
STATUS_CANNOT_PARSE = 0xC210
STATUS_INVALID = 0xC211
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_NOT_AUTHORIZED = 0x0124
"""PS3.7 Annex C general status "Refused: Not Authorized" (a Failure): the C-STORE or C-ECHO of a peer
whose ``allow`` lacks the service. Not 0xA7xx (Out of Resources), which a modality retries later."""

REJECT_PERMANENT = 0x01
REJECT_SOURCE_USER = 0x01
REJECT_CALLING_AE = 0x03
REJECT_CALLED_AE = 0x07
REJECT_NO_REASON = 0x01


@dataclass(frozen=True)
class AssociationEvent:
    """Passed to ``on_association`` hooks for every association accepted or rejected (typed event; the
    audit trail subscribes). Carries AE titles and addresses, never tag values."""

    accepted: bool
    calling_ae: str
    """The calling AE title ("" when rejected before the A-ASSOCIATE-RQ: a failed TLS handshake)."""
    called_ae: str
    address: str
    """The peer's IP address."""
    port: int
    """The peer's TCP port."""
    tls: bool
    """Whether it came in on the DICOM TLS port."""
    reason: str = ""
    """Why it was rejected ("" when accepted)."""
    allow: frozenset[str] = frozenset()
    """The services granted (``echo``, ``store``, ...) when accepted."""


@dataclass(frozen=True)
class StoredInstance:
    """Passed to ``on_stored`` hooks after an instance is durable (typed event, like pynetdicom's)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    new: bool
    announced: Announced | None = None
    """What it says about its series' size (early completion, :mod:`node.completion`)."""


@dataclass(frozen=True)
class Answered:
    """Passed to ``on_answered`` hooks once per instance any door answered, whatever the status
    (typed event; the node's metrics count them). Carries no tag values."""

    door: Literal["dimse", "stow"]
    """``dimse``: C-STORE (a request announced the UIDs); ``stow``: STOW-RS."""
    source: str
    """The calling AE title (DIMSE) or the door's source label (STOW-RS)."""
    status: int
    size: int
    """Bytes of the encoded instance."""


@dataclass(frozen=True)
class Received:
    """The outcome of storing one instance: status, and the UIDs when they could be read."""

    status: int
    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_uid: str | None = None


@dataclass(frozen=True)
class InstancesReceived:
    """Passed to ``on_received`` hooks once per association that sent C-STOREs (when it ends) and once
    per STOW-RS request (:meth:`Receiver.report_received`): what arrived, aggregated (typed event; the
    audit trail subscribes). Carries UIDs, AE titles and addresses, never other tag values."""

    door: Literal["dimse", "stow"]
    source: str
    """The calling AE title (DIMSE), or who sent the STOW-RS request (its principal's name, else
    ``STOW-RS``)."""
    address: str
    """The peer's IP address ("" if unknown)."""
    studies: dict[str, dict[str, int]]
    """Stored instances: Study Instance UID -> SOP Class UID -> count."""
    failed: int
    """Instances answered with a failure status."""
    kind: str | None = None
    """How the STOW-RS sender was authenticated (``token``, ``oidc``); None for DIMSE."""
    aborted: bool = False
    """The association was aborted (A-ABORT, connection lost), or the STOW-RS request cut short."""


def series_attributes(ds: Dataset, calling_ae: str) -> dict[str, Any]:
    """The routing attributes of config.MATCHABLE_ATTRIBUTES that live on the instance (recorded for
    its series when it is the series' first; the rule dry run, :mod:`node.rules_check`, reads files
    with it too)."""
    out: dict[str, Any] = {"CallingAETitle": calling_ae.strip()}
    for kw in ("Modality", "BodyPartExamined", "SeriesDescription", "StudyDescription", "ProtocolName",
               "Manufacturer", "ManufacturerModelName", "SOPClassUID", "ViewPosition"):
        v = ds.get(kw)
        if v not in (None, ""):
            out[kw] = str(v)
    for kw in ("ImageType", "ScanningSequence", "SequenceVariant"):  # multi-valued
        if ds.get(kw) not in (None, ""):
            out[kw] = [str(x) for x in ds[kw].value] if ds[kw].VM > 1 else [str(ds[kw].value)]
    for kw in ("SliceThickness", "EchoTime", "RepetitionTime", "MagneticFieldStrength"):
        if ds.get(kw) not in (None, ""):
            with contextlib.suppress(TypeError, ValueError):
                out[kw] = float(ds[kw].value)
    return out


def patient_key(ds: Dataset) -> str | None:
    """A one-way key of Patient ID + Issuer (to find a patient's prior studies); None without an ID."""
    pid = str(ds.get("PatientID", "") or "").strip()
    if not pid:
        return None
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    return hashlib.sha256(f"{issuer}\x00{pid}".encode("utf-8", "replace")).hexdigest()


def pixel_data_problem(ds: Dataset, transfer_syntax: str) -> str | None:
    """A reason if Pixel Data is missing or its length does not fit the image attributes."""
    if "PixelData" not in ds:
        return "no Pixel Data"
    if pydicom.uid.UID(transfer_syntax).is_compressed:
        value = ds["PixelData"].value
        return None if value else "empty encapsulated Pixel Data"
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples, bits = int(ds.SamplesPerPixel), int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (AttributeError, TypeError, ValueError):
        return "image pixel attributes missing or invalid"
    pixels = rows * cols * samples * frames
    expected = (pixels + 7) // 8 if bits == 1 else pixels * ((bits + 7) // 8)
    actual = len(ds.PixelData)
    if actual < expected:
        return f"Pixel Data has {actual} bytes, {expected} expected"
    return None


_ReceiveMethod = TypeVar("_ReceiveMethod", bound=Callable[..., "Received"])


def _reports_answer(receive: _ReceiveMethod) -> _ReceiveMethod:
    """Wraps :meth:`Receiver.receive` and :meth:`Receiver.receive_file` (each door's entry: first
    argument the instance's bytes or temp file, then its source; a C-STORE request makes it ``dimse``):
    the ``on_answered`` hook hears of every status they answer."""

    @functools.wraps(receive)
    def wrapper(self: Receiver, data: bytes | Path, source: str, *args: Any, **kwargs: Any) -> Received:
        size = 0
        with contextlib.suppress(OSError):  # a temp file is consumed by the call: measure it first
            size = data.stat().st_size if isinstance(data, Path) else len(data)
        received: Received = receive(self, data, source, *args, **kwargs)
        if self.on_answered is not None:
            request = args[0] if args else kwargs.get("request")
            self.on_answered(Answered("dimse" if request is not None else "stow", source.strip(), received.status,
                                      size))
        return received

    return cast(_ReceiveMethod, wrapper)


def _time_out_accepted_sockets(server: ThreadedAssociationServer, seconds: float) -> None:
    """Give every accepted socket a timeout; on a TLS server, leave the handshake to the association.

    pynetdicom 3.0 sets ``network_timeout`` on the listening socket only; accepted sockets block,
    so a peer that stops in the middle of a PDU holds its thread and an association slot forever.
    Its TLS server also handshakes inside ``get_request``, on the accept loop, with that blocking
    socket: one silent client would stop every other. Here the socket is wrapped without handshaking
    (``Receiver._handle_tls_handshake`` does it on the association's thread, with the timeout).
    """
    listener = cast(socket.socket, server.socket)
    context = server.ssl_context

    def get_request() -> tuple[socket.socket, tuple[str, int]]:
        sock, address = listener.accept()
        sock.settimeout(seconds)
        if context is not None:
            sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    server.get_request = get_request  # type: ignore[method-assign]


class Receiver:
    """The Storage SCP. ``start()`` returns once the port is listening."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        spool: Spool,
        clock: Callable[[], float],
        on_stored: Callable[[StoredInstance], None] | None = None,
        *,
        on_answered: Callable[[Answered], None] | None = None,
        on_accepted: Callable[[str], None] | None = None,
        on_association: Callable[[AssociationEvent], None] | None = None,
        on_received: Callable[[InstancesReceived], None] | None = None,
        peers: PeerTable | None = None,
    ) -> None:
        """``on_answered``: every status answered (:class:`Answered`); ``on_accepted``: the calling AE
        title of every association accepted (the node service passes its metrics in here);
        ``on_association``: every association accepted or rejected (:class:`AssociationEvent`).
        ``on_received``: what each association (and STOW-RS request) stored (:class:`InstancesReceived`).
        ``peers``: who may associate (default: from ``settings``, :meth:`PeerTable.from_settings`)."""
        self.settings = settings
        self.catalog = catalog
        self.spool = spool
        self.clock = clock
        self.on_stored = on_stored
        self.on_answered = on_answered
        self.on_accepted = on_accepted
        self.on_association = on_association
        self.on_received = on_received
        self.peers = peers if peers is not None else PeerTable.from_settings(settings)
        self._server: ThreadedAssociationServer | None = None
        """The plain DIMSE server (``node.plain``)."""
        self._tls_server: ThreadedAssociationServer | None = None
        """The DICOM TLS server (``node.tls``)."""
        self._lock = threading.Lock()
        self._assoc_stats: dict[int, Counter[str]] = {}
        self._assoc_studies: dict[int, dict[str, Counter[str]]] = {}
        """Per association: Study Instance UID -> SOP Class UID -> instances stored."""
        self._granted: weakref.WeakKeyDictionary[Association, frozenset[str]] = weakref.WeakKeyDictionary()
        """Services granted to each association admitted (none recorded: everything is refused)."""
        self._refusal_logged: weakref.WeakSet[Association] = weakref.WeakSet()
        self.room_gate: Callable[[], bool] = lambda: True  # the node's storage keeper (node.lifecycle) sets these
        self.study_guard: Callable[[str], contextlib.AbstractContextManager[object]] = contextlib.nullcontext

    # ---- the part that decides the status (testable without a network) ---------------------
    def store(self, encoded: bytes, request_sop_class: str, request_sop_uid: str, calling_ae: str) -> int:
        """Validate and durably store one C-STORE'd instance (File Meta included); return the status."""
        return self.receive(encoded, calling_ae, (request_sop_class, request_sop_uid)).status

    @_reports_answer
    def receive(self, encoded: bytes, source: str, request: tuple[str, str] | None = None) -> Received:
        """Validate and durably store one encoded Part 10 instance from any door.

        ``request`` is the (SOP Class, SOP Instance) UID pair a C-STORE request announced; STOW-RS
        has none, so the SOP Class is checked against the accepted storage classes instead.
        """
        if not self.has_room(len(encoded)):
            log.warning("refusing instance: storage full (node.min_free_mb, or storage watermarks)")
            return Received(STATUS_OUT_OF_RESOURCES, *(request or (None, None)))
        return self._accept(lambda: pydicom.dcmread(io.BytesIO(encoded), force=False), source, request,
                            lambda rel: self.spool.write(rel, encoded))  # an existing file (duplicate) is kept

    @_reports_answer
    def receive_file(self, tmp: Path, source: str) -> Received:
        """Validate and durably store one Part 10 instance already written to a temp file of the
        spool (:meth:`Spool.new_temp`): the STOW-RS door, which streams each part to disk.

        Same checks and statuses as :meth:`receive` (no C-STORE request, so the SOP Class is checked
        against the accepted storage classes). ``tmp`` is consumed: linked into the spool, or removed.
        """
        try:
            if not self.has_room():  # the file is written: its bytes are already off the free space
                log.warning("refusing instance: storage full (node.min_free_mb, or storage watermarks)")
                return Received(STATUS_OUT_OF_RESOURCES, None, None)
            return self._accept(lambda: pydicom.dcmread(tmp, force=False), source, None,
                                lambda rel: self.spool.place(tmp, rel))
        finally:
            tmp.unlink(missing_ok=True)

    def has_room(self, size: int = 0) -> bool:
        """Whether the spool stays above ``node.min_free_mb`` with ``size`` more bytes written, and
        :attr:`room_gate` agrees (False: above the high watermark with nothing left to purge)."""
        min_free = self.settings.node.min_free_mb * 1024 * 1024
        return (not min_free or self.spool.free_bytes() >= min_free + size) and self.room_gate()

    def _accept(self, read: Callable[[], Dataset], source: str, request: tuple[str, str] | None,
                place: Callable[[str], Stored]) -> Received:
        """The checks, the spool and the catalog, shared by both doors: ``read`` parses the instance,
        ``place`` stores its file durably at a spool path."""
        try:
            ds = read()
            transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
            study_uid, series_uid = ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID")
            sop_uid, sop_class = ds.get("SOPInstanceUID"), ds.get("SOPClassUID")
            problem = pixel_data_problem(ds, transfer_syntax)
            attributes = series_attributes(ds, source)
            patient = patient_key(ds)
            study_datetime = f"{ds.get('StudyDate', '')}{ds.get('StudyTime', '')}"[:32]
            indexed = indexed_attributes(ds)  # what QIDO-RS matches and returns
            announced = announced_by(ds)  # never raises
        except (Exception, RecursionError) as exc:  # anything the parser throws is the sender's fault
            log.warning("cannot parse instance: %s", type(exc).__name__)
            return Received(STATUS_CANNOT_PARSE, *(request or (None, None)))
        uids = Received(STATUS_SUCCESS, str(sop_class) if is_valid_uid(sop_class) else None,
                        str(sop_uid) if is_valid_uid(sop_uid) else None,
                        str(study_uid) if is_valid_uid(study_uid) else None)
        if request is not None and (sop_uid != request[1] or sop_class != request[0]):
            log.warning("SOP Class/Instance UID in the data set differ from the C-STORE request")
            return replace(uids, status=STATUS_SOP_MISMATCH)
        if request is None and sop_class not in STORAGE_SOP_CLASSES:
            log.warning("instance of a storage class this node does not accept")
            return replace(uids, status=STATUS_SOP_CLASS_NOT_SUPPORTED)
        if not all(is_valid_uid(u) for u in (study_uid, series_uid, sop_uid)):
            log.warning("instance with missing or invalid Study/Series/SOP Instance UID")
            return replace(uids, status=STATUS_INVALID)
        if problem:
            log.warning("instance refused: %s", problem)
            return replace(uids, status=STATUS_INVALID)
        assert isinstance(study_uid, str) and isinstance(series_uid, str) and isinstance(sop_uid, str)
        stored: Stored | None = None
        try:
            rel = self.spool.instance_relpath(study_uid, series_uid, sop_uid)
            with self.study_guard(study_uid):  # a purge of this study (node.lifecycle) waits, or is waited for
                stored = place(rel)  # an existing file (duplicate) is kept as it is
                recorded = self.catalog.record_instance(
                    study_uid=study_uid, series_uid=series_uid, sop_instance_uid=sop_uid,
                    sop_class_uid=str(sop_class), transfer_syntax_uid=transfer_syntax, path=rel, size=stored.size,
                    series_attributes=attributes, now=self.clock(), patient_key=patient,
                    study_datetime=study_datetime, indexed=indexed)
        except StorageError as exc:
            log.error("spool error: %s", exc)
            return replace(uids, status=STATUS_OUT_OF_RESOURCES)
        except Exception:
            log.exception("catalog error while storing an instance")
            if stored is not None and stored.new:  # answered failure: keep no file for it
                stored.path.unlink(missing_ok=True)
            return replace(uids, status=STATUS_OUT_OF_RESOURCES)
        if recorded.study_event == "new":
            log.info("study #%d (%s): receiving", recorded.study_id, ref(study_uid))
        elif recorded.study_event == "reopened":
            log.info("study #%d (%s): late instance, re-opened for a rerun", recorded.study_id, ref(study_uid))
        if self.on_stored is not None:
            self.on_stored(StoredInstance(study_uid, series_uid, sop_uid, recorded.new, announced))
        return uids

    # ---- pynetdicom glue --------------------------------------------------------------------
    def _granted_to(self, event: evt.Event, service: str) -> bool:
        """Whether the association was admitted with ``service``; logs the first refusal of each."""
        assoc = event.assoc
        with self._lock:
            granted = self._granted.get(assoc)
            first = granted is None or service not in granted
            if first and assoc in self._refusal_logged:
                first = False
            elif first:
                self._refusal_logged.add(assoc)
        if granted is not None and service in granted:
            return True
        if first:
            log.warning("%s from %s (%s) refused with 0x%04X: the peer is not allowed to %s (node.peers)",
                        "C-STORE" if service == "store" else "C-ECHO", assoc.requestor.ae_title.strip(),
                        assoc.requestor.address, STATUS_NOT_AUTHORIZED, service)
        return False

    def _handle_store(self, event: evt.Event) -> int:
        status = STATUS_CANNOT_PARSE
        received: Received | None = None
        try:
            if not self._granted_to(event, "store"):
                status = STATUS_NOT_AUTHORIZED  # nothing is read, nothing is stored
                if self.on_answered is not None:
                    self.on_answered(Answered("dimse", event.assoc.requestor.ae_title.strip(), status, 0))
                return status
            request = cast(C_STORE, event.request)
            received = self.receive(event.encoded_dataset(include_meta=True), event.assoc.requestor.ae_title,
                                    (str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID)))
            status = received.status
            return status
        finally:
            with self._lock:
                stats = self._assoc_stats.setdefault(id(event.assoc), Counter())
                stats["ok" if status == STATUS_SUCCESS else f"0x{status:04X}"] += 1
                if status == STATUS_SUCCESS and received is not None and received.study_uid:
                    studies = self._assoc_studies.setdefault(id(event.assoc), {})
                    studies.setdefault(received.study_uid, Counter())[received.sop_class_uid or ""] += 1

    def _handle_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS if self._granted_to(event, "echo") else STATUS_NOT_AUTHORIZED

    @staticmethod
    def _is_tls(assoc: Association) -> bool:
        return isinstance(getattr(assoc.dul.socket, "socket", None), ssl.SSLSocket)

    def _emit(self, event: AssociationEvent) -> None:
        if self.on_association is None:
            return
        try:
            self.on_association(event)
        except Exception:  # a subscriber's bug must not decide the association
            log.exception("on_association hook failed")

    def _reject(self, assoc: Association, diagnostic: int, reason: str, calling: str, called: str) -> None:
        """Send A-ASSOCIATE-RJ (rejected-permanent, service-user, ``diagnostic``) and end the association."""
        address, port = assoc.requestor.address, assoc.requestor.port
        log.warning("association from %s at %s refused: %s (called AE %s)", calling or "(none)", address, reason,
                    called or "(none)")
        self._emit(AssociationEvent(False, calling, called, address, port, self._is_tls(assoc), reason))
        assoc.acse.send_reject(REJECT_PERMANENT, REJECT_SOURCE_USER, diagnostic)
        assoc.kill()  # returns once the A-ASSOCIATE-RJ is out and the peer closed (or the ARTIM timer fired)

    def _handle_requested(self, event: evt.Event) -> None:
        """EVT_REQUESTED: decide on the A-ASSOCIATE-RQ before negotiation (fail closed: any error rejects)."""
        assoc = event.assoc
        calling = called = ""
        try:
            rq = assoc.requestor.primitive
            assert rq is not None
            calling = str(rq.calling_ae_title).strip()
            called = str(rq.called_ae_title).strip()
            node = self.settings.node
            if node.require_called_ae_title and called != node.ae_title.strip():
                self._reject(assoc, REJECT_CALLED_AE, "called AE title not recognised", calling, called)
                return
            admission = self.peers.admit(calling, assoc.requestor.address)
            if admission.allow is None:
                self._reject(assoc, REJECT_CALLING_AE, admission.reason, calling, called)
                return
            with self._lock:
                self._granted[assoc] = admission.allow
        except Exception:
            log.exception("association from %s at %s: admission check failed; rejecting", calling or "(none)",
                          assoc.requestor.address)
            if not assoc.is_rejected:
                self._reject(assoc, REJECT_NO_REASON, "admission check failed", calling, called)

    def _handle_rejected(self, event: evt.Event) -> None:
        """EVT_REJECTED: pynetdicom's own rejections (too many associations); ours are reported in _reject."""
        assoc = event.assoc
        rj = assoc.acceptor.primitive
        detail = (f"result 0x{rj.result or 0:02X}, source 0x{rj.result_source or 0:02X}, "
                  f"reason 0x{rj.diagnostic or 0:02X}") if rj is not None else "no detail"
        rq = assoc.requestor.primitive
        calling = str(rq.calling_ae_title).strip() if rq is not None else ""
        called = str(rq.called_ae_title).strip() if rq is not None else ""
        reason = f"rejected by the DICOM stack ({detail})"
        log.warning("association from %s at %s refused: %s", calling or "(none)", assoc.requestor.address, reason)
        self._emit(AssociationEvent(False, calling, called, assoc.requestor.address, assoc.requestor.port,
                                    self._is_tls(assoc), reason))

    def _handle_tls_handshake(self, event: evt.Event) -> None:
        """EVT_CONN_OPEN on the TLS server: the handshake, on the association's own thread (the accept
        loop only wraps the socket); a failed one closes the connection before any PDU is read."""
        assoc = event.assoc
        channel = assoc.dul.socket
        sock = getattr(channel, "socket", None)
        if channel is None or not isinstance(sock, ssl.SSLSocket):
            return
        try:
            sock.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            reason = f"TLS handshake failed: {getattr(exc, 'reason', None) or type(exc).__name__}"
            address, port = assoc.requestor.address, assoc.requestor.port
            log.warning("association from %s at %s refused: %s", "(none)", address, reason)
            self._emit(AssociationEvent(False, "", "", address, port, True, reason))
            with contextlib.suppress(OSError):
                sock.close()  # pynetdicom skips close() when shutdown() fails, as it does here
            channel.close()

    def _handle_accepted(self, event: evt.Event) -> None:
        calling = event.assoc.requestor.ae_title.strip()
        if self.on_accepted is not None:
            self.on_accepted(calling)
        with self._lock:
            granted = self._granted.get(event.assoc, frozenset())
        self._emit(AssociationEvent(True, calling, event.assoc.acceptor.ae_title.strip(),
                                    event.assoc.requestor.address, event.assoc.requestor.port,
                                    self._is_tls(event.assoc), allow=granted))

    def _handle_released(self, event: evt.Event) -> None:
        with self._lock:
            stats = self._assoc_stats.pop(id(event.assoc), None)
            studies = self._assoc_studies.pop(id(event.assoc), {})
        if stats:
            detail = ", ".join(f"{k}={v}" for k, v in sorted(stats.items()))
            log.info("association from %s closed: %s", event.assoc.requestor.ae_title.strip(), detail)
            self.report_received(InstancesReceived(
                "dimse", event.assoc.requestor.ae_title.strip(), event.assoc.requestor.address or "",
                {uid: dict(by_class) for uid, by_class in studies.items()},
                sum(n for k, n in stats.items() if k != "ok"), aborted=event.event == evt.EVT_ABORTED))

    def report_received(self, event: InstancesReceived) -> None:
        """Hand ``event`` to the ``on_received`` hook (the SCP's associations, and the STOW-RS route for
        its requests); a failing hook is logged, never raised into the door."""
        if self.on_received is None:
            return
        try:
            self.on_received(event)
        except Exception:
            log.exception("on_received hook failed")

    def build_ae(self) -> AE:
        n = self.settings.node
        ae = AE(ae_title=n.ae_title)
        ae.maximum_associations = n.max_associations
        ae.acse_timeout = n.acse_timeout_seconds
        ae.dimse_timeout = n.dimse_timeout_seconds
        ae.network_timeout = n.network_timeout_seconds
        ae.maximum_pdu_size = n.maximum_pdu_size
        ae.require_called_aet = n.require_called_ae_title
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        for cls in STORAGE_SOP_CLASSES:
            ae.add_supported_context(cls, list(TRANSFER_SYNTAXES))
        return ae

    def _handlers(self) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, self._handle_requested),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_ACCEPTED, self._handle_accepted),
            (evt.EVT_RELEASED, self._handle_released),
            (evt.EVT_ABORTED, self._handle_released),
            *NODELAY_HANDLERS,
        ]

    def start(self) -> None:
        """Start the plain server (``node.plain``) and the TLS server (``node.tls``); returns once they listen.
        :class:`ConfigError` if the TLS certificate, key or CA file cannot be used."""
        n = self.settings.node
        tls_context = server_context(n.tls) if n.tls is not None else None  # fail before listening
        ae = self.build_ae()
        if n.plain:
            server = ae.start_server((n.host, n.port), block=False, evt_handlers=self._handlers())
            assert server is not None  # non-blocking start returns the server
            _time_out_accepted_sockets(server, n.network_timeout_seconds)
            self._server = server
            log.info("storage SCP %s listening on %s:%d", n.ae_title, n.host, n.port)
        if n.tls is not None and tls_context is not None:
            handlers = [(evt.EVT_CONN_OPEN, self._handle_tls_handshake), *self._handlers()]
            try:
                server = ae.start_server((n.host, n.tls.port), block=False, evt_handlers=handlers,
                                         ssl_context=tls_context)
            except BaseException:
                self.stop()
                raise
            assert server is not None
            _time_out_accepted_sockets(server, n.network_timeout_seconds)
            self._tls_server = server
            log.info("storage SCP %s listening with DICOM TLS on %s:%d (client certificate %s)", n.ae_title, n.host,
                     n.tls.port, "required" if n.tls.require_client_cert else "optional")

    def stop(self) -> None:
        for server in (self._server, self._tls_server):
            if server is not None:
                server.shutdown()
        self._server = self._tls_server = None
