"""End to end: a negative result and a declined series reach the PACS as results.

storescu -> dicom-node (ct-lung-nodules) -> Orthanc, real processes: a 5 mm chest CT without
nodules (analysed, no longer skipped) gives an SR saying nodules and masses are absent, with the
detector's sensitivity at 5 mm, and a PDF saying "none found"; a 7 mm series the model declines
gives an SR and a PDF saying what was not assessed and why, while its job stays ``skipped``. Every
object validates with dciodvfy (0 errors) and reads back with highdicom.
"""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from testkit.dicom import write_ct_series
from testkit.harness import pdf_text, storescu, wait_for
from testkit.phantom import make_ct_phantom
from testkit.thick_slices import thick_phantom
from tests.e2e.test_end_to_end import Stack, _start, _status, _validate
from workers.encode.sr_content import ABSENT, COMMENT, PRESENCE, UNDETERMINED

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NODULE, MASS = ("27925004", "SCT"), ("4147007", "SCT")


def _report_groups(data: bytes) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(data)))
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    assert report.get_planar_roi_measurement_groups() == [] and report.get_volumetric_roi_measurement_groups() == []
    groups = list(report.get_image_measurement_groups())
    types = [g.finding_type for g in groups]
    assert [(t.value, t.scheme_designator) for t in types if t is not None] == [NODULE, MASS]
    return groups


def _comments(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> list[str]:
    return [str(i.TextValue) for i in group[0].ContentSequence
            if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == COMMENT.value]


def _pdf(data: bytes) -> str:
    ds = pydicom.dcmread(io.BytesIO(data))
    return " ".join(" ".join(pdf_text(bytes(ds.EncapsulatedDocument)[: int(ds.EncapsulatedDocumentLength)])).split())


def _results(stack: Stack, study_uid: str, tmp_path: Path, name: str) -> tuple[bytes, bytes]:
    """The study's SR and PDF from Orthanc, both dciodvfy-clean; nothing else came back."""
    assert set(stack.orthanc.modalities_of_study(study_uid)) == {"SR", "DOC"}  # no SEG, no key images
    [sr] = stack.orthanc.instance_files(study_uid, "SR")
    [pdf] = stack.orthanc.instance_files(study_uid, "DOC")
    _validate(tmp_path, f"{name}-sr.dcm", sr)
    _validate(tmp_path, f"{name}-pdf.dcm", pdf)
    return sr, pdf


def test_negative_and_not_assessed_results_reach_the_pacs(tmp_path: Path) -> None:
    stack_gen = _start(tmp_path, redis_mode=False, models=("ct-lung-nodules",))
    stack = next(stack_gen)
    try:
        clear = thick_phantom(41, 5.0, nodules=0, vessels=2, rows=128, cols=128, pixel_mm=2.0)
        clear_files = write_ct_series(clear, tmp_path / "clear", uid_seed="negative-clear", patient_id="NEG-1")
        thick = make_ct_phantom(16, 96, 96, pixel_mm=3.0, slice_mm=7.0, seed=43, nodules=2)
        thick_files = write_ct_series(thick, tmp_path / "thick", uid_seed="negative-thick", patient_id="NEG-2")
        studies = [str(pydicom.dcmread(f[0], stop_before_pixels=True).StudyInstanceUID)
                   for f in (clear_files, thick_files)]
        for folder in ("clear", "thick"):
            assert storescu(stack.node_port, tmp_path / folder).returncode == 0

        def arrived() -> bool:
            return all({"SR": 1, "DOC": 1}.items() <= stack.orthanc.modalities_of_study(s).items() for s in studies)

        try:
            wait_for(arrived, 240, interval=0.25, what="an SR and a PDF for each study")
        except TimeoutError:
            print(stack.logs()[-5000:])
            raise
        assert _status(stack)["jobs"] == {"done": 1, "skipped": 1}  # the declined job stays skipped

        # a chest CT without nodules, 5 mm slices: analysed, and the report says nothing was found
        sr, pdf = _results(stack, studies[0], tmp_path, "negative")
        for group in _report_groups(sr):
            [presence] = group.get_qualitative_evaluations(name=PRESENCE)
            assert presence.value == ABSENT
            [sensitivity] = group.get_measurements()
            assert sensitivity.name.value == "111089" and 0.0 < float(sensitivity.value) <= 100.0
            assert "5.0 mm slices" in _comments(group)[0]
        text = _pdf(pdf)
        assert "Nodule none found" in text and "Mass none found" in text and "Lesion Sensitivity" in text

        # a 7 mm series: declined, and the report says what was not assessed and why
        sr, pdf = _results(stack, studies[1], tmp_path, "not-assessed")
        for group in _report_groups(sr):
            [presence] = group.get_qualitative_evaluations(name=PRESENCE)
            assert presence.value == UNDETERMINED
            assert _comments(group) == ["Not assessed: ct-lung-nodules needs slices at most 5 mm apart, got 7 mm"]
        assert "Not assessed: Nodule, Mass. Reason: ct-lung-nodules needs slices at most 5 mm apart" in _pdf(pdf)
    finally:
        for _ in stack_gen:  # runs the generator's clean-up
            pass
