"""TID 1500 SR of detections, classifications and registrations: round trip through bytes and highdicom."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from models.base import Detection, ModelResult, Registration, Volume
from tests.unit.encode_helpers import (
    SCT_LUNG,
    SCT_MILD,
    SCT_NODULE,
    detection_at,
    emphysema_classification,
    load_ct_real_20,
    read_bytes,
    run_dciodvfy,
    synthetic_result,
    volume_from_datasets,
    write_bytes,
)
from workers.encode.measure import measure_segments
from workers.encode.seg import EmptyResultError, build_seg, to_pydicom_code
from workers.encode.sr import build_sr
from workers.encode.sr_content import (
    CERTAINTY_OF_FINDING,
    DIAMETER,
    DISTANCE,
    SCORE,
    classification_tracking_uid,
    detection_outline,
    detection_tracking_uid,
    nearest_slice,
)
from workers.encode.uids import input_fingerprint, result_uids, segment_tracking_uid

SOFTWARE_VERSION = "0.1.0-test"
MODEL = "test-nodules"


@pytest.fixture(scope="module")
def sources() -> list[pydicom.Dataset]:
    return load_ct_real_20()


@pytest.fixture(scope="module")
def volume(sources: list[pydicom.Dataset]) -> Volume:
    return volume_from_datasets(sources, with_pixels=False)


@pytest.fixture(scope="module")
def detections(volume: Volume) -> tuple[Detection, ...]:
    # Plausible lung positions on the 512x512 slices; the second centre rounds up (12.6 -> 13).
    return (
        detection_at(volume, 1, (180.3, 240.7, 7.4), diameter_mm=8.5, confidence=0.87),
        detection_at(volume, 2, (330.0, 260.2, 12.6), diameter_mm=5.0, confidence=0.29),
    )


@pytest.fixture(scope="module")
def findings_result(detections: tuple[Detection, ...]) -> ModelResult:
    return ModelResult(
        model_name=MODEL, model_version="1.0.0", detections=detections,
        classifications=(emphysema_classification(),),
    )


@pytest.fixture(scope="module")
def sr_bytes(sources: list[pydicom.Dataset], findings_result: ModelResult) -> bytes:
    ds = build_sr(sources, findings_result, software_version=SOFTWARE_VERSION, finding_site=SCT_LUNG)
    return write_bytes(ds)


def _report(ds: pydicom.Dataset) -> hd.sr.MeasurementReport:
    content = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


@pytest.fixture(scope="module")
def report(sr_bytes: bytes) -> hd.sr.MeasurementReport:
    return _report(read_bytes(sr_bytes))


def _group_templates(ds: pydicom.Dataset) -> list[str]:
    """Template ids of the measurement groups, in document order."""
    (container,) = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return [str(group.ContentTemplateSequence[0].TemplateIdentifier) for group in container.ContentSequence]


def _code(value: object) -> tuple[str, str]:
    return (str(value.value), str(value.scheme_designator))  # type: ignore[attr-defined]


# --- detections + classification, no SEG -----------------------------------------------------------


def test_header_and_evidence(sr_bytes: bytes, sources: list[pydicom.Dataset], findings_result: ModelResult) -> None:
    ds = read_bytes(sr_bytes)
    uids = result_uids(
        sources[0].SeriesInstanceUID, MODEL, "1.0.0", "SR", input_fingerprint(d.SOPInstanceUID for d in sources)
    )
    assert (ds.SeriesInstanceUID, ds.SOPInstanceUID) == (uids.series_uid, uids.sop_instance_uid)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert "PredecessorDocumentsSequence" not in ds
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    evidence = {sop for _, _, sop, _ in sr.get_evidence()}
    assert evidence == {d.SOPInstanceUID for d in sources}  # no SEG


def test_groups_in_order(sr_bytes: bytes, report: hd.sr.MeasurementReport) -> None:
    assert _group_templates(read_bytes(sr_bytes)) == ["1410", "1410", "1501"]
    assert len(report.get_planar_roi_measurement_groups()) == 2
    assert report.get_volumetric_roi_measurement_groups() == []


def test_detection_groups(
    report: hd.sr.MeasurementReport, sources: list[pydicom.Dataset], detections: tuple[Detection, ...]
) -> None:
    groups = report.get_planar_roi_measurement_groups()
    series = sources[0].SeriesInstanceUID
    for group, det, slice_index in zip(groups, detections, (7, 13), strict=True):
        # the identifier OHIF needs to list the finding; the finding's own identity is the UID
        assert group.tracking_identifier in ("Cornerstone3DTools@^0.1.0:CircleROI",
                                             "Cornerstone3DTools@^0.1.0:EllipticalROI")
        assert group.tracking_uid == detection_tracking_uid(series, MODEL, det.tracking_id)
        assert group.tracking_uid != segment_tracking_uid(series, MODEL, det.tracking_id)
        assert group.finding_type is not None and _code(group.finding_type) == (SCT_NODULE.value, "SCT")
        assert [_code(site.value) for site in group.finding_sites] == [(SCT_LUNG.value, "SCT")]
        assert group.reference_type == codes.DCM.ImageRegion

        region = group.roi
        assert isinstance(region, hd.sr.ImageRegion)
        (ref,) = region.ContentSequence[0].ReferencedSOPSequence
        assert ref.ReferencedSOPInstanceUID == sources[slice_index].SOPInstanceUID
        assert ref.ReferencedSOPClassUID == sources[slice_index].SOPClassUID
        assert region.graphic_type == hd.sr.GraphicTypeValues.CIRCLE
        centre, perimeter = region.value
        i, j, _ = det.centre_ijk
        radius_px = det.diameter_mm / 2 / float(sources[slice_index].PixelSpacing[1])
        np.testing.assert_allclose(centre, (i + 0.5, j + 0.5), rtol=1e-6)  # SCOORD: pixel centres at +0.5
        np.testing.assert_allclose(perimeter, (i + 0.5 + radius_px, j + 0.5), rtol=1e-6)
        # Independent check with highdicom's image -> patient transform (same SCOORD convention):
        # in plane the circle centre is the detection centre, through plane the slice is the nearest.
        (centre_lps,) = hd.spatial.ImageToReferenceTransformer.for_image(sources[slice_index])(np.array([centre]))
        np.testing.assert_allclose(centre_lps[:2], det.centre_lps[:2], atol=1e-3)
        assert abs(centre_lps[2] - det.centre_lps[2]) <= 0.5 * 2.0  # slices 2 mm apart

        (diameter,) = group.get_measurements(name=DIAMETER)
        (certainty,) = group.get_measurements(name=CERTAINTY_OF_FINDING)
        assert len(group.get_measurements()) == 2
        assert diameter.value == pytest.approx(det.diameter_mm, rel=1e-12)
        assert _code(diameter.unit) == ("mm", "UCUM")
        assert certainty.value == pytest.approx(100 * det.confidence, rel=1e-12)
        assert _code(certainty.unit) == ("%", "UCUM")
        (coords,) = diameter.referenced_coordinates  # the dcmjs/OHIF layout: SCOORD under the NUM
        assert coords.graphic_type == region.graphic_type
        np.testing.assert_array_equal(coords.value, region.value)


def test_classification_group(
    report: hd.sr.MeasurementReport, sources: list[pydicom.Dataset], findings_result: ModelResult
) -> None:
    (classification,) = findings_result.classifications
    (group,) = report.get_image_measurement_groups()
    assert group.tracking_identifier == classification.name
    assert group.tracking_uid == classification_tracking_uid(sources[0].SeriesInstanceUID, MODEL, "Emphysema")
    assert group.finding_type is not None and _code(group.finding_type) == (classification.concept.value, "SCT")
    (score,) = group.get_measurements(name=SCORE)
    assert score.value == pytest.approx(classification.score, rel=1e-12)
    assert _code(score.unit) == ("%", "UCUM")
    (evaluation,) = group.get_qualitative_evaluations(name=to_pydicom_code(classification.concept))
    assert _code(evaluation.name) == (classification.concept.value, "SCT")
    assert _code(evaluation.value) == (SCT_MILD.value, "SCT")


def test_dciodvfy_no_errors(sr_bytes: bytes, tmp_path: Path) -> None:
    errors, _warnings = run_dciodvfy(sr_bytes, tmp_path, "sr-findings.dcm")
    assert errors == []


def test_detection_uids_stable_across_versions(
    sources: list[pydicom.Dataset], findings_result: ModelResult
) -> None:
    v2 = replace(findings_result, model_version="2.0.0")
    a = build_sr(sources, findings_result, software_version="x")
    b = build_sr(sources, v2, software_version="x")
    assert a.SOPInstanceUID != b.SOPInstanceUID
    uids_a = [g.tracking_uid for g in _report(a).get_planar_roi_measurement_groups()]
    uids_b = [g.tracking_uid for g in _report(b).get_planar_roi_measurement_groups()]
    assert uids_a == uids_b and len(set(uids_a)) == 2


# --- combined, registration, predecessor --------------------------------------------------------


def test_combined_result_planar_first(
    sources: list[pydicom.Dataset], volume: Volume, findings_result: ModelResult, tmp_path: Path
) -> None:
    segments = synthetic_result(volume.voxels.shape).segments
    registration = Registration(
        transform=np.eye(4), residual_mm=1.25, metric_value=-0.5,
        resampled=np.zeros((1, 1, 1), dtype=np.float32), prior_frame_of_reference_uid="1.2.3.4",
    )
    result = replace(findings_result, segments=segments, registration=registration)
    seg = build_seg(sources, result, software_version=SOFTWARE_VERSION)
    measurements = measure_segments(volume, segments)  # geometry-only volume: every mean and SD is 0
    data = write_bytes(
        build_sr(sources, result, seg=seg, measurements=measurements, software_version=SOFTWARE_VERSION)
    )
    ds = read_bytes(data)
    # 2 detections, 3 non-empty segments (the empty "Nodule" has none), 1 classification, registration
    assert _group_templates(ds) == ["1410", "1410", "1411", "1411", "1411", "1501", "1501"]
    report = _report(ds)
    assert [g.tracking_identifier for g in report.get_volumetric_roi_measurement_groups()] == [
        "Body", "Right lung", "Left lung",
    ]
    emphysema, reg = report.get_image_measurement_groups()
    assert emphysema.tracking_identifier == "Emphysema"
    assert reg.finding_type is not None and _code(reg.finding_type) == ("112353", "DCM")
    (residual,) = reg.get_measurements(name=DISTANCE)
    assert residual.value == pytest.approx(1.25) and _code(residual.unit) == ("mm", "UCUM")
    assert residual.derivation is not None and _code(residual.derivation) == ("C2347976", "UMLS")
    evidence = {sop for _, _, sop, _ in hd.sr.Comprehensive3DSR.from_dataset(ds).get_evidence()}
    assert seg.SOPInstanceUID in evidence
    errors, _ = run_dciodvfy(data, tmp_path, "sr-combined.dcm")
    assert errors == []


def test_predecessor(sources: list[pydicom.Dataset], findings_result: ModelResult, tmp_path: Path) -> None:
    earlier = read_bytes(write_bytes(build_sr(sources[:-1], findings_result, software_version="x")))
    data = write_bytes(build_sr(sources, findings_result, software_version="x", predecessor=earlier))
    ds = read_bytes(data)
    assert ds.SeriesInstanceUID == earlier.SeriesInstanceUID  # a rerun lands in the same series
    assert ds.SOPInstanceUID != earlier.SOPInstanceUID
    (study,) = ds.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == earlier.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == earlier.SeriesInstanceUID
    (instance,) = series.ReferencedSOPSequence
    assert (instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID) == (
        earlier.SOPClassUID, earlier.SOPInstanceUID,
    )
    errors, _ = run_dciodvfy(data, tmp_path, "sr-predecessor.dcm")
    assert errors == []
    # Same input: the same SOP Instance UID; it does not supersede itself.
    same = build_sr(sources, findings_result, software_version="x", predecessor=ds)
    assert same.SOPInstanceUID == ds.SOPInstanceUID and "PredecessorDocumentsSequence" not in same


def test_predecessor_checked(sources: list[pydicom.Dataset], findings_result: ModelResult) -> None:
    with pytest.raises(ValueError, match="not an SR"):
        build_sr(sources, findings_result, software_version="x", predecessor=sources[0])
    other = pydicom.Dataset()  # an SR of another study (never modify built SRs: they share elements with sources)
    other.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    other.StudyInstanceUID, other.SeriesInstanceUID, other.SOPInstanceUID = "1.2.3.4.6", "1.2.3.4.6.1", "1.2.3.4.6.1.1"
    with pytest.raises(ValueError, match="another study"):
        build_sr(sources, findings_result, software_version="x", predecessor=other)


# --- nothing to report, bad inputs, geometry -------------------------------------------------------


def test_empty_result_raises(sources: list[pydicom.Dataset], volume: Volume) -> None:
    with pytest.raises(EmptyResultError, match="every segment is empty"):
        build_sr(sources, ModelResult(MODEL, "1.0.0"), software_version="x")
    empty_segments = tuple(
        replace(s, mask=np.zeros_like(s.mask)) for s in synthetic_result(volume.voxels.shape).segments
    )
    with pytest.raises(EmptyResultError):
        build_sr(sources, ModelResult(MODEL, "1.0.0", segments=empty_segments), software_version="x")


def test_inconsistent_inputs_raise(
    sources: list[pydicom.Dataset], volume: Volume, findings_result: ModelResult
) -> None:
    det = findings_result.detections[0]
    with pytest.raises(ValueError, match="outside the 20 slices"):
        build_sr(sources, replace(findings_result, detections=(replace(det, centre_ijk=(1.0, 1.0, 19.6)),)),
                 software_version="x")
    with pytest.raises(ValueError, match="unique"):
        build_sr(sources, replace(findings_result, detections=(det, det)), software_version="x")
    with_segments = replace(findings_result, segments=synthetic_result(volume.voxels.shape).segments)
    with pytest.raises(ValueError, match="pass the SEG"):
        build_sr(sources, with_segments, software_version="x")
    measurements = measure_segments(volume, with_segments.segments)
    with pytest.raises(ValueError, match="without the seg"):
        build_sr(sources, findings_result, measurements=measurements, software_version="x")


def test_nearest_slice_rounds_half_up(detections: tuple[Detection, ...]) -> None:
    det = detections[0]
    assert [nearest_slice(replace(det, centre_ijk=(0.0, 0.0, k)), 20) for k in (-0.4, 12.5, 12.49, 19.4)] == [
        0, 13, 12, 19,
    ]
    with pytest.raises(ValueError):
        nearest_slice(replace(det, centre_ijk=(0.0, 0.0, -0.6)), 20)


def test_outline_is_ellipse_for_rectangular_pixels(detections: tuple[Detection, ...]) -> None:
    image = pydicom.Dataset()
    image.SOPInstanceUID = "1.2.3"
    image.PixelSpacing = [0.5, 1.0]  # rows 0.5 mm apart, columns 1 mm apart
    det = replace(detections[0], centre_ijk=(10.0, 20.0, 0.0), diameter_mm=4.0)
    graphic_type, data = detection_outline(det, image)
    assert graphic_type == hd.sr.GraphicTypeValues.ELLIPSE
    # radius 2 mm = 2 columns = 4 rows: the major axis is vertical
    np.testing.assert_allclose(data, [[10.5, 16.5], [10.5, 24.5], [8.5, 20.5], [12.5, 20.5]])
