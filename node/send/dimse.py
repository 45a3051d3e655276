"""C-STORE SCU: one association per batch, presentation contexts negotiated per file.

For each SOP class we propose the file's own transfer syntax plus Explicit and Implicit VR Little
Endian; if the destination accepts only an uncompressed syntax for a compressed file, the file is
decompressed before sending, so a PACS that lacks a codec still gets the object.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom import uid as tsuid
from pydicom.dataset import Dataset
from pynetdicom import AE

from node.config import DimseDestination
from node.send.base import DestinationUnreachable, SendReport

log = logging.getLogger("node.send.dimse")

MAX_CONTEXTS = 128
"""DICOM's limit of presentation contexts per association."""
UNCOMPRESSED = (tsuid.ExplicitVRLittleEndian, tsuid.ImplicitVRLittleEndian)


class DimseSender:
    def __init__(self, destination: DimseDestination, calling_ae_title: str, timeout_seconds: float) -> None:
        self.destination = destination
        self.calling = destination.calling_ae_title or calling_ae_title
        self.timeout = timeout_seconds

    def send(self, files: Sequence[Path]) -> SendReport:
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
        wanted: dict[str, list[str]] = {}
        for _, ds in datasets:
            ts = str(ds.file_meta.TransferSyntaxUID)
            syntaxes = wanted.setdefault(str(ds.SOPClassUID), [])
            for s in (ts, *UNCOMPRESSED):
                if s not in syntaxes:
                    syntaxes.append(s)
        if len(wanted) > MAX_CONTEXTS:
            raise DestinationUnreachable(f"{len(wanted)} SOP classes exceed one association")
        for sop_class, syntaxes in wanted.items():
            ae.add_requested_context(sop_class, syntaxes)
        d = self.destination
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title)
        if not assoc.is_established:
            raise DestinationUnreachable(f"no association with {d.name} ({d.host}:{d.port})")
        try:
            for path, ds in datasets:
                self._store_one(assoc, path, ds, report)
                if not assoc.is_established:
                    for p, _ in datasets:
                        if p not in report.sent and p not in report.failed:
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
