"""STOW-RS sender against a real Orthanc with the DICOMweb plugin, over loopback."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from models.errors import DestinationUnreachable
from node.config import DicomwebDestination
from node.conformance import LABEL_MAP_SEGMENTATION_STORAGE, SEGMENTATION_STORAGE
from node.schema import BINARY_VARIANT, LABELMAP_VARIANT
from node.send.stow import StowSender
from testkit.harness import Orthanc, free_port


def web(orthanc: Orthanc, **kw: object) -> DicomwebDestination:
    return DicomwebDestination.model_validate(
        {"name": "web", "type": "dicomweb", "url": orthanc.url("/dicom-web/"), **kw})


def study_uid(files: dict[Path, str]) -> str:
    return str(pydicom.dcmread(next(iter(files)), stop_before_pixels=True).StudyInstanceUID)


def test_orthanc_stores_the_binary_set_by_stow(variant_files: dict[Path, str], orthanc: Orthanc) -> None:
    report = StowSender(web(orthanc), 10).send(list(variant_files), variant_files)
    assert not report.failed
    assert {variant_files[p] for p in report.sent} == {BINARY_VARIANT}
    assert {variant_files[p] for p in report.not_needed} == {LABELMAP_VARIANT}
    assert orthanc.modalities_of_study(study_uid(variant_files)) == {"SEG": 1, "SR": 1}
    [seg_bytes] = orthanc.instance_files(study_uid(variant_files), "SEG")
    seg_sent = next(p for p in report.sent if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG")
    assert seg_bytes == seg_sent.read_bytes()  # stored byte for byte
    assert pydicom.dcmread(io.BytesIO(seg_bytes)).SOPClassUID == SEGMENTATION_STORAGE


def test_a_labelmap_capable_service_gets_the_labelmap_set(variant_files: dict[Path, str], orthanc: Orthanc) -> None:
    report = StowSender(web(orthanc, accepts_labelmap=True), 10).send(list(variant_files), variant_files)
    assert not report.failed
    assert {variant_files[p] for p in report.sent} == {LABELMAP_VARIANT}
    [seg_bytes] = orthanc.instance_files(study_uid(variant_files), "SEG")
    seg = pydicom.dcmread(io.BytesIO(seg_bytes))
    assert seg.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLSLossless  # sent compressed, as encoded


def test_basic_authentication_against_orthanc(variant_files: dict[Path, str], tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path, node_port=free_port(), users={"ainode": "correct horse"}).start()
    try:
        secret = tmp_path / "pacs-password"
        secret.write_text("wrong\n")
        sender = StowSender(web(orthanc, username="ainode", password_file=str(secret)), 10)
        refused = sender.send(list(variant_files), variant_files)
        assert refused.sent == [] and {r[:8] for r in refused.failed.values()} == {"HTTP 401"}
        assert orthanc.modalities_of_study(study_uid(variant_files)) == {}

        secret.write_text("correct horse\n")
        report = sender.send(list(variant_files), variant_files)
        assert not report.failed and len(report.sent) == 2
        assert orthanc.modalities_of_study(study_uid(variant_files)) == {"SEG": 1, "SR": 1}
    finally:
        orthanc.stop()


def test_a_stopped_service_is_unreachable(variant_files: dict[Path, str], orthanc: Orthanc) -> None:
    orthanc.stop()
    with pytest.raises(DestinationUnreachable, match="unreachable"):
        StowSender(web(orthanc), 5).send(list(variant_files), variant_files)
