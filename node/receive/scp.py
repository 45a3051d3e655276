"""Storage SCP: validate -> spool -> catalog -> status. Nothing else happens here.

Success (0x0000) is answered only after the file is fsynced and renamed into the spool and its
catalog row committed. Failures get the DICOM status a sending modality understands:

    0xA700  Out of Resources    the spool or catalog could not store it (disk full, below floor)
    0xA900  Data Set does not match SOP Class   UIDs in the data set differ from the request
    0xC210  Cannot understand   the data set could not be parsed
    0xC211  Cannot understand   required identifiers missing/invalid, or Pixel Data truncated
    0x0122  SOP Class not supported   (STOW-RS only; DIMSE negotiation refuses it earlier)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import ThreadedAssociationServer

from node.catalog import Catalog
from node.config import Settings
from node.conformance import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, VERIFICATION_SOP_CLASS
from node.dicomweb.attributes import indexed_attributes
from node.logutil import ref
from node.nodelay import NODELAY_HANDLERS
from node.spool import Spool, StorageError, Stored, is_valid_uid

log = logging.getLogger("node.receive")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_MISMATCH = 0xA900
STATUS_CANNOT_PARSE = 0xC210
STATUS_INVALID = 0xC211
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122

@dataclass(frozen=True)
class StoredInstance:
    """Passed to ``on_stored`` hooks after an instance is durable (typed event, like pynetdicom's)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    new: bool


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


def _series_attributes(ds: Dataset, calling_ae: str) -> dict[str, Any]:
    """The routing attributes of config.MATCHABLE_ATTRIBUTES that live on the instance."""
    out: dict[str, Any] = {"CallingAETitle": calling_ae.strip()}
    for kw in ("Modality", "BodyPartExamined", "SeriesDescription", "StudyDescription", "ProtocolName",
               "Manufacturer", "ManufacturerModelName", "SOPClassUID"):
        v = ds.get(kw)
        if v not in (None, ""):
            out[kw] = str(v)
    if "ImageType" in ds:
        out["ImageType"] = [str(x) for x in ds.ImageType] if ds["ImageType"].VM > 1 else [str(ds.ImageType)]
    if ds.get("SliceThickness") not in (None, ""):
        with contextlib.suppress(TypeError, ValueError):
            out["SliceThickness"] = float(ds.SliceThickness)
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
    """Give every accepted socket a timeout.

    pynetdicom 3.0 sets ``network_timeout`` on the listening socket only; accepted sockets block,
    so a peer that stops in the middle of a PDU holds its thread and an association slot forever.
    """
    accept = server.get_request

    def get_request() -> tuple[socket.socket, tuple[str, int]]:
        sock, address = accept()
        sock.settimeout(seconds)
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
    ) -> None:
        """``on_answered``: every status answered (:class:`Answered`); ``on_accepted``: the calling AE
        title of every association accepted (the node service passes its metrics in here)."""
        self.settings = settings
        self.catalog = catalog
        self.spool = spool
        self.clock = clock
        self.on_stored = on_stored
        self.on_answered = on_answered
        self.on_accepted = on_accepted
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()
        self._assoc_stats: dict[int, Counter[str]] = {}

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
            log.warning("refusing instance: free space below node.min_free_mb")
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
                log.warning("refusing instance: free space below node.min_free_mb")
                return Received(STATUS_OUT_OF_RESOURCES, None, None)
            return self._accept(lambda: pydicom.dcmread(tmp, force=False), source, None,
                                lambda rel: self.spool.place(tmp, rel))
        finally:
            tmp.unlink(missing_ok=True)

    def has_room(self, size: int = 0) -> bool:
        """Whether the spool stays above ``node.min_free_mb`` with ``size`` more bytes written."""
        min_free = self.settings.node.min_free_mb * 1024 * 1024
        return not min_free or self.spool.free_bytes() >= min_free + size

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
            attributes = _series_attributes(ds, source)
            patient = patient_key(ds)
            study_datetime = f"{ds.get('StudyDate', '')}{ds.get('StudyTime', '')}"[:32]
            indexed = indexed_attributes(ds)  # what QIDO-RS matches and returns
        except (Exception, RecursionError) as exc:  # anything the parser throws is the sender's fault
            log.warning("cannot parse instance: %s", type(exc).__name__)
            return Received(STATUS_CANNOT_PARSE, *(request or (None, None)))
        uids = Received(STATUS_SUCCESS, str(sop_class) if is_valid_uid(sop_class) else None,
                        str(sop_uid) if is_valid_uid(sop_uid) else None)
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
            stored = place(rel)  # an existing file (duplicate) is kept as it is
            recorded = self.catalog.record_instance(
                study_uid=study_uid,
                series_uid=series_uid,
                sop_instance_uid=sop_uid,
                sop_class_uid=str(sop_class),
                transfer_syntax_uid=transfer_syntax,
                path=rel,
                size=stored.size,
                series_attributes=attributes,
                now=self.clock(),
                patient_key=patient,
                study_datetime=study_datetime,
                indexed=indexed,
            )
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
            self.on_stored(StoredInstance(study_uid, series_uid, sop_uid, recorded.new))
        return uids

    # ---- pynetdicom glue --------------------------------------------------------------------
    def _handle_store(self, event: evt.Event) -> int:
        status = STATUS_CANNOT_PARSE
        try:
            request = cast(C_STORE, event.request)
            status = self.store(
                event.encoded_dataset(include_meta=True),
                str(request.AffectedSOPClassUID),
                str(request.AffectedSOPInstanceUID),
                event.assoc.requestor.ae_title,
            )
            return status
        finally:
            with self._lock:
                stats = self._assoc_stats.setdefault(id(event.assoc), Counter())
                stats["ok" if status == STATUS_SUCCESS else f"0x{status:04X}"] += 1

    def _handle_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _handle_accepted(self, event: evt.Event) -> None:
        if self.on_accepted is not None:
            self.on_accepted(event.assoc.requestor.ae_title.strip())

    def _handle_released(self, event: evt.Event) -> None:
        with self._lock:
            stats = self._assoc_stats.pop(id(event.assoc), None)
        if stats:
            detail = ", ".join(f"{k}={v}" for k, v in sorted(stats.items()))
            log.info("association from %s closed: %s", event.assoc.requestor.ae_title.strip(), detail)

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

    def start(self) -> None:
        n = self.settings.node
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_ACCEPTED, self._handle_accepted),
            (evt.EVT_RELEASED, self._handle_released),
            (evt.EVT_ABORTED, self._handle_released),
            *NODELAY_HANDLERS,
        ]
        server = self.build_ae().start_server((n.host, n.port), block=False, evt_handlers=handlers)
        assert server is not None  # non-blocking start returns the server
        _time_out_accepted_sockets(server, n.network_timeout_seconds)
        self._server = server
        log.info("storage SCP %s listening on %s:%d", n.ae_title, n.host, n.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
