"""Negative results and declined series are results: the SR says what was looked for and that it is
absent, or that it was not assessed and why; the PDF says the same; the pipeline writes both for a
series the model declines while the job ends ``skipped``."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes
from sqlalchemy import select

from models.base import Code, Figure, ModelResult, Volume
from models.ct_lung_nodules import CtLungNodules
from models.ct_lung_nodules.model import LESION_SENSITIVITY
from node.catalog import Catalog, JobSpec
from node.config import parse_settings
from node.schema import JobState, Result
from node.spool import Spool
from testkit.dicom import write_ct_series
from testkit.harness import pdf_text
from testkit.phantom import make_ct_phantom
from tests.unit.encode_helpers import (
    SCT_NODULE,
    detection_at,
    load_ct_real_20,
    read_bytes,
    run_dciodvfy,
    volume_from_datasets,
    write_bytes,
)
from workers.encode.pdf import build_pdf_report
from workers.encode.seg import EmptyResultError, to_pydicom_code
from workers.encode.sr import build_sr
from workers.encode.sr_content import ABSENT, COMMENT, PRESENCE, UNDETERMINED, absence_tracking_uid
from workers.encode.uids import input_fingerprint, result_uids
from workers.outputs import encode_results
from workers.pipeline import WorkerContext, run_job

SOFTWARE_VERSION = "0.1.0-test"
SCT_MASS = Code("4147007", "SCT", "Mass")
SENSITIVITY = Figure(LESION_SENSITIVITY, 96.0, "%",
                     "sensitivity for solid nodules >= 6 mm on phantoms with 5.0 mm slices")
REASON = "ct-lung-nodules needs slices at most 5 mm apart, got 7 mm"


@pytest.fixture(scope="module")
def sources() -> list[pydicom.Dataset]:
    return load_ct_real_20()


@pytest.fixture(scope="module")
def volume(sources: list[pydicom.Dataset]) -> Volume:
    return volume_from_datasets(sources, with_pixels=False)


def negative() -> ModelResult:
    return ModelResult("ct-lung-nodules", "1.2.0", looked_for=(SCT_NODULE, SCT_MASS), figures=(SENSITIVITY,))


def declined() -> ModelResult:
    return ModelResult("ct-lung-nodules", "1.2.0", looked_for=(SCT_NODULE, SCT_MASS), not_assessed=REASON)


def _groups(data: bytes) -> tuple[hd.sr.MeasurementReport, list[hd.sr.MeasurementsAndQualitativeEvaluations]]:
    sr = hd.sr.Comprehensive3DSR.from_dataset(read_bytes(data))
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    return report, list(report.get_image_measurement_groups())


def _comments(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> list[str]:
    return [str(item.TextValue) for item in group[0].ContentSequence
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == COMMENT.value]


def test_negative_sr_says_what_was_looked_for_and_that_it_is_absent(
        sources: list[pydicom.Dataset], tmp_path: Path) -> None:
    data = write_bytes(build_sr(sources, negative(), software_version=SOFTWARE_VERSION))
    errors, _ = run_dciodvfy(data, tmp_path, "negative-sr.dcm")
    assert errors == []
    report, groups = _groups(data)
    assert report.get_planar_roi_measurement_groups() == [] and report.get_volumetric_roi_measurement_groups() == []
    assert [g.finding_type for g in groups] == [to_pydicom_code(SCT_NODULE), to_pydicom_code(SCT_MASS)]
    series_uid = str(sources[0].SeriesInstanceUID)
    for group, concept in zip(groups, (SCT_NODULE, SCT_MASS), strict=True):
        [presence] = group.get_qualitative_evaluations(name=PRESENCE)
        assert presence.value == ABSENT  # SCT 272519000, CID 240
        [sensitivity] = group.get_measurements(name=to_pydicom_code(LESION_SENSITIVITY))
        assert float(sensitivity.value) == 96.0 and sensitivity.unit == codes.UCUM.Percent
        assert _comments(group) == [f"Lesion Sensitivity: {SENSITIVITY.note}"]
        assert group.tracking_uid == absence_tracking_uid(series_uid, "ct-lung-nodules", concept)
        assert str(group.tracking_identifier).endswith(": absent")
    ds = read_bytes(data)
    assert ds.CompletionFlag == "COMPLETE" and ds.VerificationFlag == "UNVERIFIED"
    assert ds.PreliminaryFlag == "PRELIMINARY"


def test_not_assessed_sr_says_why_and_replaces_like_any_sr(sources: list[pydicom.Dataset], tmp_path: Path) -> None:
    ds = build_sr(sources, declined(), software_version=SOFTWARE_VERSION)
    data = write_bytes(ds)
    errors, _ = run_dciodvfy(data, tmp_path, "not-assessed-sr.dcm")
    assert errors == []
    _, groups = _groups(data)
    assert [g.finding_type for g in groups] == [to_pydicom_code(SCT_NODULE), to_pydicom_code(SCT_MASS)]
    for group in groups:
        [presence] = group.get_qualitative_evaluations(name=PRESENCE)
        assert presence.value == UNDETERMINED  # SCT 373068000, CID 240
        assert group.get_measurements() == []  # no sensitivity claim for a series that was not analysed
        assert _comments(group) == [f"Not assessed: {REASON}"]
        assert str(group.tracking_identifier).endswith(": not assessed")
    # the UIDs of the model's SR on this series: a later successful run replaces it in the PACS
    uids = result_uids(str(sources[0].SeriesInstanceUID), "ct-lung-nodules", "1.2.0", "SR",
                       input_fingerprint(str(s.SOPInstanceUID) for s in sources))
    assert (ds.SOPInstanceUID, ds.SeriesInstanceUID) == (uids.sop_instance_uid, uids.series_uid)


def test_findings_keep_their_report_and_carry_the_figures(sources: list[pydicom.Dataset], volume: Volume) -> None:
    """With findings no absence group is added (OHIF 3.12 cannot load a report mixing planar groups
    with groups without coordinates); the sensitivity goes with each finding."""
    found = replace(negative(), detections=(detection_at(volume, 1, (180.3, 240.7, 7.4), 8.5, 0.87),))
    report, groups = _groups(write_bytes(build_sr(sources, found, software_version=SOFTWARE_VERSION)))
    assert groups == []
    [planar] = report.get_planar_roi_measurement_groups()
    [sensitivity] = planar.get_measurements(name=to_pydicom_code(LESION_SENSITIVITY))
    assert float(sensitivity.value) == 96.0


def test_inconsistent_or_empty_results_are_refused(sources: list[pydicom.Dataset], volume: Volume) -> None:
    with pytest.raises(EmptyResultError, match="looked-for"):
        build_sr(sources, ModelResult("m", "1.0.0"), software_version=SOFTWARE_VERSION)
    both = replace(declined(), detections=(detection_at(volume, 1, (180.3, 240.7, 7.4), 8.5, 0.87),))
    with pytest.raises(ValueError, match="not assessed cannot have findings"):
        build_sr(sources, both, software_version=SOFTWARE_VERSION)
    with pytest.raises(ValueError, match="looked-for concepts must be unique"):
        build_sr(sources, replace(negative(), looked_for=(SCT_NODULE, SCT_NODULE)), software_version=SOFTWARE_VERSION)
    with pytest.raises(EmptyResultError):
        build_pdf_report(sources, volume, ModelResult("m", "1.0.0"), software_version=SOFTWARE_VERSION)


def _pdf_text(ds: pydicom.Dataset) -> str:
    document = bytes(ds.EncapsulatedDocument)[: int(ds.EncapsulatedDocumentLength)]
    return " ".join(" ".join(pdf_text(document)).split())


def test_pdf_says_the_same(sources: list[pydicom.Dataset], volume: Volume, tmp_path: Path) -> None:
    neg = build_pdf_report(sources, volume, negative(), software_version=SOFTWARE_VERSION)
    errors, _ = run_dciodvfy(write_bytes(neg), tmp_path, "negative-pdf.dcm")
    assert errors == []
    text = _pdf_text(neg)
    assert "Looked for" in text and "Nodule none found" in text and "Mass none found" in text
    assert "Lesion Sensitivity: 96 %" in text and "5.0 mm slices" in text
    text = _pdf_text(build_pdf_report(sources, volume, declined(), software_version=SOFTWARE_VERSION))
    assert f"Not assessed: Nodule, Mass. Reason: {REASON}" in text and "none found" not in text
    found = replace(negative(), detections=(detection_at(volume, 1, (180.3, 240.7, 7.4), 8.5, 0.87),))
    text = _pdf_text(build_pdf_report(sources, volume, found, software_version=SOFTWARE_VERSION))
    assert "Nodule 1 found" in text and "Mass none found" in text


def test_encode_results_writes_sr_and_pdf_only(sources: list[pydicom.Dataset], volume: Volume) -> None:
    """The manifest's looks_for fills the result's; no SEG or key image without anything to show."""
    model = CtLungNodules()
    for result in (ModelResult("ct-lung-nodules", "1.2.0"),
                   ModelResult("ct-lung-nodules", "1.2.0", not_assessed=REASON)):
        out = encode_results(model, sources, volume, result, software_version=SOFTWARE_VERSION)
        assert sorted(str(e.dataset.Modality) for e in out) == ["DOC", "SR"]
        sr = next(e.dataset for e in out if e.dataset.Modality == "SR")
        _, groups = _groups(write_bytes(sr))
        assert [g.finding_type for g in groups] == [to_pydicom_code(SCT_NODULE), to_pydicom_code(SCT_MASS)]


def test_pipeline_writes_the_not_assessed_report_and_skips_the_job(tmp_path: Path) -> None:
    """A real job: ct-lung-nodules declines a 7 mm series; the SR and PDF are recorded with their
    deliveries, and the job ends skipped with the reason."""
    phantom = make_ct_phantom(12, 64, 64, pixel_mm=5.0, slice_mm=7.0, seed=3, nodules=0)
    files = write_ct_series(phantom, tmp_path / "series", uid_seed="declined")
    settings = parse_settings({"node": {"storage_dir": str(tmp_path / "storage")}})
    catalog = Catalog.for_storage(tmp_path / "storage")
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        catalog.record_instance(study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                                sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, path=str(f), size=1,
                                series_attributes={"Modality": "CT"}, now=0.0)
    catalog.mark_quiet_studies_ready(1.0)
    [series] = catalog.series_of_study(1)
    [job_id] = catalog.create_jobs(1, 1, [JobSpec(series.id, "ct-lung-nodules", "r", ("pacs",))], 0.0)
    ctx = WorkerContext(settings, catalog, Spool(tmp_path / "storage"), clock=lambda: 10.0)
    assert run_job(ctx, job_id) == JobState.SKIPPED
    job = catalog.get_job(job_id)
    assert job is not None and job.state == JobState.SKIPPED and "at most 5 mm apart, got 7 mm" in (job.error or "")
    with catalog.session() as s:
        results = {r.kind: r.path for r in s.scalars(select(Result).where(Result.job_id == job_id))}
    assert set(results) == {"SR", "DOC"}
    assert catalog.counts()["deliveries"] == {"pending": 2}
    sr = pydicom.dcmread(ctx.spool.path(results["SR"]))
    _, groups = _groups(write_bytes(sr))
    assert all("Not assessed: ct-lung-nodules needs slices at most 5 mm apart" in _comments(g)[0] for g in groups)
    text = _pdf_text(pydicom.dcmread(io.BytesIO(ctx.spool.path(results["DOC"]).read_bytes())))
    assert "Not assessed: Nodule, Mass" in text
