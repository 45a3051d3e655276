"""PDF report (Encapsulated PDF): round trip through bytes, the page's text and images, UIDs, dciodvfy."""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.base import ModelResult, Volume
from testkit.harness import pdf_text
from tests.unit.encode_helpers import (
    ct_real_20_volume,
    detection_at,
    emphysema_classification,
    load_ct_real_20,
    read_bytes,
    run_dciodvfy,
    synthetic_result,
    write_bytes,
)
from tests.unit.test_encode_sc import Series, phantom_results, phantom_series
from workers.encode.measure import measure_segments
from workers.encode.pdf import ENCAPSULATED_PDF_STORAGE, build_pdf_report
from workers.encode.render import render_key_images
from workers.encode.seg import EmptyResultError
from workers.encode.series import series_description, series_number

SOFTWARE_VERSION = "0.1.0-test"
FAMILIES = ("segmentation", "detection", "classification", "registration")


def _iso(da: str) -> str:
    return f"{da[:4]}-{da[4:6]}-{da[6:]}"


def image_count(pdf: bytes) -> int:
    return len(re.findall(rb"/Subtype /Image", pdf))


def page_count(pdf: bytes) -> int:
    return len(re.findall(rb"/Type /Page\b(?!s)", pdf))


def document(ds: pydicom.Dataset) -> bytes:
    doc = bytes(ds.EncapsulatedDocument)
    assert len(doc) % 2 == 0 and len(doc) - int(ds.EncapsulatedDocumentLength) in (0, 1)
    return doc[: int(ds.EncapsulatedDocumentLength)]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Series:
    return phantom_series(tmp_path_factory.mktemp("phantom-ct-pdf"))


@pytest.fixture(scope="module")
def reports(phantom: Series) -> dict[str, pydicom.Dataset]:
    """Each family's report, through bytes."""
    sources, volume, ph = phantom
    out = {}
    for family, result in phantom_results(volume, ph).items():
        measurements = measure_segments(volume, result.segments)
        ds = build_pdf_report(sources, volume, result, software_version=SOFTWARE_VERSION, measurements=measurements)
        out[family] = read_bytes(write_bytes(ds))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_header_and_dciodvfy(reports: dict[str, pydicom.Dataset], phantom: Series, family: str, tmp_path: Path) -> None:
    ds = reports[family]
    sources, volume, ph = phantom
    result = phantom_results(volume, ph)[family]
    assert ds.SOPClassUID == ENCAPSULATED_PDF_STORAGE == ds.file_meta.MediaStorageSOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert (ds.Modality, ds.MIMETypeOfEncapsulatedDocument, ds.BurnedInAnnotation) == ("DOC", "application/pdf", "YES")
    assert ds.SeriesNumber == series_number("PDF")
    assert ds.SeriesDescription == series_description("PDF", result.model_name)
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyID", "AccessionNumber", "StudyDate"):
        assert ds[keyword].value == sources[0][keyword].value, keyword
    assert ds.DocumentTitle == f"AI report {result.model_name} {result.model_version}"
    assert ds.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert [i.ReferencedSOPInstanceUID for i in ds.SourceInstanceSequence] == [s.SOPInstanceUID for s in sources]
    pdf = document(ds)
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    assert page_count(pdf) == 1
    errors, warnings = run_dciodvfy(write_bytes(ds), tmp_path, f"pdf-{family}.dcm")
    assert errors == [] and warnings == []


def test_findings_tables(reports: dict[str, pydicom.Dataset], phantom: Series) -> None:
    sources, volume, ph = phantom
    results = phantom_results(volume, ph)
    for family, ds in reports.items():
        text = pdf_text(document(ds))
        result = results[family]
        assert f"AI analysis report: {result.model_name}" in text
        assert any(t.startswith("AI result - not for diagnosis.") for t in text)
        assert any(t.startswith(f"Study date {_iso(str(sources[0].StudyDate))}") for t in text)
        versions = f"Model {result.model_name} {result.model_version}; node software dicom-ai-node {SOFTWARE_VERSION}."
        assert versions in text
        # No patient name or ID on the page (the viewer shows the header).
        assert not any(str(sources[0].PatientID) in t or str(sources[0].PatientName) in t for t in text)
    seg_text = pdf_text(document(reports["segmentation"]))
    for m in measure_segments(volume, results["segmentation"].segments):
        assert m.mean is not None and m.sd is not None
        i = seg_text.index(m.name)
        assert seg_text[i + 1 : i + 4] == [f"{m.volume_ml:.1f}", f"{m.mean:.1f}", f"{m.sd:.1f}"]
    det_text = pdf_text(document(reports["detection"]))
    assert "Location LPS (mm)" in det_text
    for number, det in enumerate(results["detection"].detections, start=1):
        i = det_text.index(f"({det.centre_lps[0]:.1f}, {det.centre_lps[1]:.1f}, {det.centre_lps[2]:.1f})")
        assert det_text[i - 4 : i] == [str(number), "Nodule", f"{det.diameter_mm:.1f}", f"{det.confidence * 100:.0f}"]
    cls_text = pdf_text(document(reports["classification"]))
    i = cls_text.index("Emphysema")
    assert cls_text[i + 1 : i + 3] == ["Mild", "12.3 %"]
    reg_text = pdf_text(document(reports["registration"]))
    assert "1.25" in reg_text


def test_key_images_are_the_rendered_ones(reports: dict[str, pydicom.Dataset], phantom: Series) -> None:
    sources, volume, ph = phantom
    for family, result in phantom_results(volume, ph).items():
        assert image_count(document(reports[family])) == len(render_key_images(volume, result)), family
    # Images given by the caller (as the pipeline shares them with the SC encoder) are used as they are.
    result = phantom_results(volume, ph)["detection"]
    shots = render_key_images(volume, result, max_images=2)
    ds = build_pdf_report(sources, volume, result, software_version=SOFTWARE_VERSION, key_images=[shots[0].pixels])
    assert image_count(document(ds)) == 1


def test_deterministic(phantom: Series) -> None:
    """Same input: same UIDs and the same PDF bytes; another source set: another instance in the same series."""
    sources, volume, ph = phantom
    result = phantom_results(volume, ph)["detection"]
    a = build_pdf_report(sources, volume, result, software_version=SOFTWARE_VERSION)
    b = build_pdf_report(sources, volume, result, software_version=SOFTWARE_VERSION)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    assert a.EncapsulatedDocument == b.EncapsulatedDocument
    changed = list(sources)
    changed[0] = copy.deepcopy(sources[0])
    changed[0].SOPInstanceUID = changed[0].SOPInstanceUID + ".9"
    c = build_pdf_report(changed, volume, result, software_version=SOFTWARE_VERSION)
    assert c.SeriesInstanceUID == a.SeriesInstanceUID and c.SOPInstanceUID != a.SOPInstanceUID


def test_real_ct_with_every_finding(tmp_path: Path) -> None:
    """The real CT (ISO_IR 100, JPEG 2000 sources): a result with segments, detections and a classification."""
    sources: list[pydicom.Dataset] = load_ct_real_20()
    volume: Volume = ct_real_20_volume()
    dets = (detection_at(volume, 1, (200.0, 250.0, 10.0), 8.3, 0.92),)
    result = replace(synthetic_result(volume.voxels.shape), detections=dets,
                     classifications=(emphysema_classification(),))
    ds = read_bytes(write_bytes(build_pdf_report(sources, volume, result, software_version=SOFTWARE_VERSION)))
    assert ds.SpecificCharacterSet == sources[0].SpecificCharacterSet
    text = pdf_text(document(ds))
    assert {"Body", "Right lung", "Left lung", "Nodule", "Emphysema", "Mild", "8.3", "92"} <= set(text)
    assert page_count(document(ds)) == 1
    errors, warnings = run_dciodvfy(write_bytes(ds), tmp_path, "pdf-real.dcm")
    assert errors == [] and warnings == []


def test_errors(phantom: Series) -> None:
    sources, volume, ph = phantom
    with pytest.raises(EmptyResultError):
        build_pdf_report(sources, volume, ModelResult("m", "1"), software_version=SOFTWARE_VERSION)
    result = phantom_results(volume, ph)["segmentation"]
    with pytest.raises(ValueError, match="measurements"):
        build_pdf_report(sources, volume, result, software_version=SOFTWARE_VERSION,
                         measurements=measure_segments(volume, result.segments)[:1])
    with pytest.raises(ValueError, match="RGB"):
        build_pdf_report(sources, volume, result, software_version=SOFTWARE_VERSION,
                         measurements=measure_segments(volume, result.segments),
                         key_images=[np.zeros((8, 8), dtype=np.uint8)])
