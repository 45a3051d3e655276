"""C-STORE SCU: one association per batch, presentation contexts negotiated per file.

For each SOP class we propose, in a context of its own, each transfer syntax its files have, and
one context of Explicit and Implicit VR Little Endian. A file whose own syntax was accepted is sent
as it is on disk: pynetdicom streams the encoded dataset from the file
(``_config.STORE_SEND_CHUNKED_DATASET``, turned on for that call only), nothing is decoded or
encoded again. Otherwise the file is read and sent as a dataset: pynetdicom converts between the
uncompressed syntaxes, and a compressed file is decompressed first if the destination accepted
only an uncompressed syntax, so a PACS that lacks a codec still gets the object. Only the file meta
is read up front (SOP class, instance, transfer syntax); no file is held in memory longer than its
own C-STORE.

With ``tls`` on the destination the association runs over DICOM TLS (:mod:`node.tls`): the
destination's certificate must be trusted and name its ``host``.

Label map SEGs (SOP class 1.2.840.10008.5.1.4.1.1.66.7) are newer than most PACS: when a batch
holds both variants of a result, the labelmap set is sent if the destination accepted that class
in this association, else the binary set; the other set is reported as not needed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, _config
from pynetdicom.association import Association

from models.errors import ConfigError, DestinationUnreachable
from node.config import DimseDestination
from node.conformance import LABEL_MAP_SEGMENTATION_STORAGE, UNCOMPRESSED_TRANSFER_SYNTAXES
from node.nodelay import NODELAY_HANDLERS
from node.schema import BINARY_VARIANT, LABELMAP_VARIANT
from node.send.base import SendReport
from node.tls import client_context

log = logging.getLogger("node.send.dimse")

MAX_CONTEXTS = 128
"""DICOM's limit of presentation contexts per association."""


class FileHead(NamedTuple):
    """What the file meta of a Part 10 file says (read without its dataset)."""

    sop_class_uid: str
    transfer_syntax: UID


def file_head(path: Path) -> FileHead:
    """The SOP class and transfer syntax of a Part 10 file from its file meta; raises if unreadable."""
    meta = read_file_meta_info(path)
    sop_class, ts = meta.get("MediaStorageSOPClassUID"), meta.get("TransferSyntaxUID")
    if not sop_class or not ts or not meta.get("MediaStorageSOPInstanceUID"):
        raise ValueError("file meta lacks the SOP Class, SOP Instance or Transfer Syntax UID")
    return FileHead(str(sop_class), UID(ts))


class DimseSender:
    def __init__(self, destination: DimseDestination, calling_ae_title: str, timeout_seconds: float) -> None:
        self.destination = destination
        self.calling = destination.calling_ae_title or calling_ae_title
        self.timeout = timeout_seconds

    def send(self, files: Sequence[Path], variants: Mapping[Path, str] | None = None) -> SendReport:
        variants = variants or {}
        report = SendReport()
        heads: list[tuple[Path, FileHead]] = []
        for path in files:
            try:
                heads.append((path, file_head(path)))
            except Exception as exc:  # a result file we cannot read is reported, not fatal
                report.failed[path] = f"unreadable: {type(exc).__name__}"
        if not heads:
            return report
        ae = AE(ae_title=self.calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        # One context per (SOP class, syntax of its files) and one uncompressed context per SOP class:
        # an SCP picks one syntax per context, often uncompressed when offered in the same list.
        wanted: dict[tuple[str, tuple[str, ...]], None] = {}
        for _, head in heads:
            wanted[(head.sop_class_uid, (str(head.transfer_syntax),))] = None
            wanted[(head.sop_class_uid, UNCOMPRESSED_TRANSFER_SYNTAXES)] = None
        if len(wanted) > MAX_CONTEXTS:
            raise DestinationUnreachable(f"{len(wanted)} presentation contexts exceed one association")
        for sop_class, syntaxes in wanted:
            ae.add_requested_context(sop_class, list(syntaxes))
        d = self.destination
        try:
            tls_args = (client_context(d.tls, f"destinations[{d.name}].tls"), d.host) if d.tls is not None else None
        except ConfigError as exc:  # a key or certificate removed or replaced badly since start-up
            raise DestinationUnreachable(str(exc)) from None
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title, evt_handlers=list(NODELAY_HANDLERS),
                             tls_args=tls_args)
        if not assoc.is_established:
            raise DestinationUnreachable(f"no association with {d.name} ({d.host}:{d.port}"
                                         f"{', DICOM TLS' if tls_args else ''})")
        accepted: dict[str, set[str]] = {}
        """SOP class -> the transfer syntaxes accepted for it."""
        for cx in assoc.accepted_contexts:
            accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
        skip = BINARY_VARIANT if LABEL_MAP_SEGMENTATION_STORAGE in accepted else LABELMAP_VARIANT
        try:
            for path, head in heads:
                if variants.get(path) == skip:
                    report.not_needed.append(path)
                    continue
                self._store_one(assoc, path, head, accepted.get(head.sop_class_uid, set()), report)
                if not assoc.is_established:
                    for p, _ in heads:
                        if p not in report.sent and p not in report.failed and p not in report.not_needed:
                            report.failed[p] = "association lost"
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        return report

    def _store_one(self, assoc: Association, path: Path, head: FileHead, accepted: set[str],
                   report: SendReport) -> None:
        if not accepted:
            report.failed[path] = "SOP class not accepted by the destination"
            return
        try:
            if head.transfer_syntax in accepted:
                status = _send_file(assoc, path)
            else:  # converted by pynetdicom (uncompressed syntaxes), or decompressed here
                ds = pydicom.dcmread(path)
                if ds.file_meta.TransferSyntaxUID.is_compressed:
                    ds.decompress(generate_instance_uid=False)  # another syntax, the same instance
                status = _c_store(assoc, ds)
        except (OSError, InvalidDicomError, NotImplementedError, ValueError, AttributeError) as exc:
            # the file changed or vanished since its meta was read, or cannot be decoded or converted
            report.failed[path] = f"unreadable: {type(exc).__name__}"
            return
        code = getattr(status, "Status", None)
        if code is None:
            report.failed[path] = "no response (timeout or abort)"
        elif code == 0x0000 or 0xB000 <= code <= 0xBFFF:
            report.sent.append(path)
        else:
            report.failed[path] = f"status 0x{code:04X}"


def _send_file(assoc: Association, path: Path) -> Dataset:
    """C-STORE of a file as it is encoded on disk: pynetdicom reads its dataset in PDU-sized chunks.

    pynetdicom reads the flag once, at the start of ``send_c_store``, and it only changes what a call
    with a path does (none other in the node passes one). It is restored at once: another thread
    restoring it before this call read it only makes that call decode the file (same result)."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return _c_store(assoc, path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def _c_store(assoc: Association, dataset: Dataset | Path) -> Dataset:
    """``assoc.send_c_store``, working around a race in pynetdicom (3.0.4, and its main branch).

    ``send_c_store`` pauses the association's reactor thread while it waits for its response, and
    releases it at its end; the next call waits only until ``_is_paused`` is true, which it still is
    from before when that thread has not run since it was released. When it then runs late (a busy
    machine), it takes the next C-STORE response off the queue ("Received unexpected C-STORE service
    message"), and the call waits ``dimse_timeout`` and aborts the association (seen 1 in ~20 runs of
    300 instances to Orthanc, with or without chunked sending). Marking the thread as running makes
    the next call wait until it has really paused again (at most its 1 ms loop)."""
    try:
        return assoc.send_c_store(dataset)
    finally:
        if assoc.is_alive():  # a reactor that ended never pauses again: leave its flag
            assoc._is_paused = False
