"""C-STORE SCU: one association per batch, presentation contexts negotiated per file.

For each SOP class we propose the file's own transfer syntax plus Explicit and Implicit VR Little
Endian; if the destination accepts only an uncompressed syntax for a compressed file, the file is
decompressed before sending, so a PACS that lacks a codec still gets the object.

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

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE

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


class DimseSender:
    def __init__(self, destination: DimseDestination, calling_ae_title: str, timeout_seconds: float) -> None:
        self.destination = destination
        self.calling = destination.calling_ae_title or calling_ae_title
        self.timeout = timeout_seconds

    def send(self, files: Sequence[Path], variants: Mapping[Path, str] | None = None) -> SendReport:
        variants = variants or {}
        report = SendReport()
        datasets: list[tuple[Path, Dataset]] = []
        for path in files:
            try:
                datasets.append((path, pydicom.dcmread(path)))
            except Exception as exc:  # a result file we cannot read is reported, not fatal
                report.failed[path] = f"unreadable: {type(exc).__name__}"
        if not datasets:
            return report
        ae = AE(ae_title=self.calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        # One context per (SOP class, compressed syntax) and one uncompressed context per SOP class:
        # an SCP picks one syntax per context, often uncompressed when offered in the same list.
        wanted: dict[tuple[str, tuple[str, ...]], None] = {}
        for _, ds in datasets:
            ts = str(ds.file_meta.TransferSyntaxUID)
            if ts not in UNCOMPRESSED_TRANSFER_SYNTAXES:
                wanted[(str(ds.SOPClassUID), (ts,))] = None
            wanted[(str(ds.SOPClassUID), UNCOMPRESSED_TRANSFER_SYNTAXES)] = None
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
        labelmap_ok = any(cx.abstract_syntax == LABEL_MAP_SEGMENTATION_STORAGE for cx in assoc.accepted_contexts)
        skip = BINARY_VARIANT if labelmap_ok else LABELMAP_VARIANT
        try:
            for path, ds in datasets:
                if variants.get(path) == skip:
                    report.not_needed.append(path)
                    continue
                self._store_one(assoc, path, ds, report)
                if not assoc.is_established:
                    for p, _ in datasets:
                        if p not in report.sent and p not in report.failed and p not in report.not_needed:
                            report.failed[p] = "association lost"
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        return report

    def _store_one(self, assoc: object, path: Path, ds: Dataset, report: SendReport) -> None:
        from pynetdicom.association import Association

        assert isinstance(assoc, Association)
        accepted = [
            cx.transfer_syntax[0]
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax == ds.SOPClassUID
        ]
        if not accepted:
            report.failed[path] = "SOP class not accepted by the destination"
            return
        ts = ds.file_meta.TransferSyntaxUID
        if ts not in accepted and ts.is_compressed:
            ds.decompress()
        status = assoc.send_c_store(ds)
        code = getattr(status, "Status", None)
        if code is None:
            report.failed[path] = "no response (timeout or abort)"
        elif code == 0x0000 or 0xB000 <= code <= 0xBFFF:
            report.sent.append(path)
        else:
            report.failed[path] = f"status 0x{code:04X}"
