"""LABELMAP or BINARY per destination, over real associations: Orthanc 1.10 (no Label Map
Segmentation class) gets the BINARY set, a destination that accepts 66.7 gets the LABELMAP set."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.events import Event

from node.config import DimseDestination
from node.conformance import LABEL_MAP_SEGMENTATION_STORAGE, SEGMENTATION_STORAGE
from node.schema import BINARY_VARIANT, LABELMAP_VARIANT
from node.send.dimse import DimseSender
from testkit.harness import ORTHANC_AE, Orthanc, free_port

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


class ModernPacs:
    """A storage SCP that accepts both segmentation classes and the SR."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[Dataset] = []
        self.ae = AE(ae_title="MODERN")
        for sop_class in (LABEL_MAP_SEGMENTATION_STORAGE, SEGMENTATION_STORAGE, COMPREHENSIVE_3D_SR):
            self.ae.add_supported_context(sop_class, [pydicom.uid.ExplicitVRLittleEndian,
                                                      pydicom.uid.JPEGLSLossless])
        self.lock = threading.Lock()

    def _store(self, event: Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.received.append(ds)
        return 0x0000

    def __enter__(self) -> ModernPacs:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def test_orthanc_gets_the_binary_set(variant_files: dict[Path, str], orthanc: Orthanc) -> None:
    dest = DimseDestination(name="pacs", type="dimse", ae_title=ORTHANC_AE, host="127.0.0.1",
                            port=orthanc.dicom_port)
    report = DimseSender(dest, "AI-NODE", 10).send(list(variant_files), variant_files)
    assert not report.failed
    assert {variant_files[p] for p in report.sent} == {BINARY_VARIANT}
    assert {variant_files[p] for p in report.not_needed} == {LABELMAP_VARIANT}
    study = pydicom.dcmread(next(iter(variant_files)), stop_before_pixels=True).StudyInstanceUID
    assert orthanc.modalities_of_study(str(study)) == {"SEG": 1, "SR": 1}
    [seg_bytes] = orthanc.instance_files(str(study), "SEG")
    [sr_bytes] = orthanc.instance_files(str(study), "SR")
    import io

    seg = pydicom.dcmread(io.BytesIO(seg_bytes))
    sr = pydicom.dcmread(io.BytesIO(sr_bytes))
    assert seg.SOPClassUID == SEGMENTATION_STORAGE
    cited = {item.ReferencedSOPInstanceUID
             for study_item in sr.CurrentRequestedProcedureEvidenceSequence
             for series_item in study_item.ReferencedSeriesSequence
             for item in series_item.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in cited  # the SR Orthanc holds cites the SEG Orthanc holds


def test_a_labelmap_capable_destination_gets_the_labelmap_set(variant_files: dict[Path, str]) -> None:
    with ModernPacs() as pacs:
        dest = DimseDestination(name="modern", type="dimse", ae_title="MODERN", host="127.0.0.1", port=pacs.port)
        report = DimseSender(dest, "AI-NODE", 10).send(list(variant_files), variant_files)
    assert not report.failed
    assert {variant_files[p] for p in report.sent} == {LABELMAP_VARIANT}
    assert {variant_files[p] for p in report.not_needed} == {BINARY_VARIANT}
    classes = sorted(str(ds.SOPClassUID) for ds in pacs.received)
    assert classes == sorted([LABEL_MAP_SEGMENTATION_STORAGE, COMPREHENSIVE_3D_SR])
    seg = next(ds for ds in pacs.received if ds.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE)
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLSLossless  # sent compressed, as encoded
    labels = np.unique(seg.pixel_array)
    assert set(labels.tolist()) <= {0, 1, 2} and 2 in labels
