"""Measurements and the TID 1500 SR encoder: round trip through bytes and highdicom."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from models.base import Code, ModelResult, Volume
from tests.unit.encode_helpers import (
    box,
    ct_real_20_volume,
    load_ct_real_20,
    read_bytes,
    run_dciodvfy,
    synthetic_result,
    write_bytes,
)
from workers.encode.measure import SegmentMeasurement, measure_segments
from workers.encode.seg import EmptyResultError, build_seg
from workers.encode.sr import build_sr
from workers.encode.uids import device_uid, input_fingerprint, result_uids, segment_tracking_uid

SOFTWARE_VERSION = "0.1.0-test"
HU = codes.UCUM.HounsfieldUnit


# --- measure_segments ---------------------------------------------------------------------------


def _small_volume(voxels: np.ndarray, spacing: tuple[float, float, float] = (2.0, 0.5, 0.25)) -> Volume:
    """Volume with spacing (k, j, i) in mm."""
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    return Volume(
        voxels=voxels.astype(np.float32),
        affine=affine,
        modality="CT",
        sop_instance_uids=tuple(f"1.2.3.{k}" for k in range(voxels.shape[0])),
        frame_of_reference_uid="1.2.3",
    )


def test_measure_known_values() -> None:
    voxels = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) - 50
    volume = _small_volume(voxels)
    result = synthetic_result((4, 5, 6), with_empty=False)
    a = box((4, 5, 6), (1, 1, 1), (3, 4, 5))
    empty = np.zeros((4, 5, 6), dtype=bool)
    segments = (replace(result.segments[0], mask=a), replace(result.segments[1], mask=empty))
    first, second = measure_segments(volume, segments)
    values = voxels[a].astype(np.float64)
    assert first == SegmentMeasurement(
        name=segments[0].name,
        segment_number=1,
        voxel_count=24,
        volume_ml=first.volume_ml,  # checked below: the determinant is not exact in binary
        mean=float(values.mean()),
        sd=float(values.std()),
    )
    assert first.volume_ml == pytest.approx(24 * 2.0 * 0.5 * 0.25 / 1000.0, rel=1e-12)
    assert second == SegmentMeasurement(segments[1].name, 2, 0, 0.0, None, None)
    assert second.is_empty and not first.is_empty


def test_measure_real_ct(result_on_ct: ModelResult) -> None:
    volume = ct_real_20_volume()
    measurements = measure_segments(volume, result_on_ct.segments)
    assert [m.segment_number for m in measurements] == list(range(1, len(result_on_ct.segments) + 1))
    assert [m.name for m in measurements] == [s.name for s in result_on_ct.segments]
    body = measurements[0]
    assert body.voxel_count == int(result_on_ct.segments[0].mask.sum())
    assert body.volume_ml == pytest.approx(body.voxel_count * 0.9765625**2 * 2.0 / 1000.0, rel=1e-12)
    assert -1100 < (body.mean or 0) < 3000


def test_measure_shape_mismatch_raises() -> None:
    volume = _small_volume(np.zeros((4, 5, 6)))
    segment = synthetic_result((4, 5, 7), with_empty=False).segments[0]
    with pytest.raises(ValueError, match="shape"):
        measure_segments(volume, [segment])


# --- build_sr ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources() -> list[pydicom.Dataset]:
    return load_ct_real_20()


@pytest.fixture(scope="module")
def result_on_ct() -> ModelResult:
    return synthetic_result(ct_real_20_volume().voxels.shape)


@pytest.fixture(scope="module")
def seg(sources: list[pydicom.Dataset], result_on_ct: ModelResult) -> pydicom.Dataset:
    return build_seg(sources, result_on_ct, software_version=SOFTWARE_VERSION)


@pytest.fixture(scope="module")
def measurements(result_on_ct: ModelResult) -> list[SegmentMeasurement]:
    return measure_segments(ct_real_20_volume(), result_on_ct.segments)


@pytest.fixture(scope="module")
def sr_bytes(
    sources: list[pydicom.Dataset],
    seg: pydicom.Dataset,
    result_on_ct: ModelResult,
    measurements: list[SegmentMeasurement],
) -> bytes:
    return write_bytes(
        build_sr(sources, result_on_ct, seg=seg, measurements=measurements, software_version=SOFTWARE_VERSION)
    )


@pytest.fixture(scope="module")
def sr(sr_bytes: bytes) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR.from_dataset(read_bytes(sr_bytes))


def test_sr_header(
    sr: hd.sr.Comprehensive3DSR,
    sources: list[pydicom.Dataset],
    seg: pydicom.Dataset,
    result_on_ct: ModelResult,
) -> None:
    uids = result_uids(
        sources[0].SeriesInstanceUID, result_on_ct.model_name, result_on_ct.model_version, "SR",
        input_fingerprint(ds.SOPInstanceUID for ds in sources),
    )
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == (uids.series_uid, uids.sop_instance_uid)
    assert sr.SeriesNumber == 901
    assert sr.SeriesDescription == f"AI SR {result_on_ct.model_name}"
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.VerificationFlag == "UNVERIFIED"
    evidence = {(series, sop) for _, series, sop, _ in sr.get_evidence()}
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) in evidence
    assert {(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in sources} <= evidence


def test_sr_report_context(sr: hd.sr.Comprehensive3DSR, result_on_ct: ModelResult) -> None:
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    (observer,) = report.get_observer_contexts()
    assert observer.observer_type == codes.cid270.Device
    device = observer.observer_identifying_attributes
    assert isinstance(device, hd.sr.DeviceObserverIdentifyingAttributes)
    assert device.uid == device_uid("dicom-ai-node", result_on_ct.model_name, result_on_ct.model_version)
    assert device.name == result_on_ct.model_name
    assert device.manufacturer_name == "dicom-ai-node"
    assert device.model_name == result_on_ct.model_name
    procedures = [
        (item.ConceptCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodingSchemeDesignator)
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"  # Procedure reported
    ]
    assert procedures == [("25045-6", "LN")]  # CT unspecified body region


def test_sr_groups_round_trip(
    sr: hd.sr.Comprehensive3DSR,
    sources: list[pydicom.Dataset],
    seg: pydicom.Dataset,
    result_on_ct: ModelResult,
    measurements: list[SegmentMeasurement],
) -> None:
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_volumetric_roi_measurement_groups()
    non_empty = [(s, m) for s, m in zip(result_on_ct.segments, measurements, strict=True) if not m.is_empty]
    assert len(non_empty) == 3  # the empty "Nodule" has no group
    assert len(groups) == len(non_empty)
    seg_descriptions = {int(d.SegmentNumber): d for d in seg.SegmentSequence}
    for group, (segment, measurement) in zip(groups, non_empty, strict=True):
        assert group.tracking_identifier == segment.name
        expected_tracking = segment_tracking_uid(
            sources[0].SeriesInstanceUID, result_on_ct.model_name, segment.name
        )
        assert group.tracking_uid == expected_tracking
        assert seg_descriptions[measurement.segment_number].TrackingUID == expected_tracking  # SEG <-> SR
        assert group.finding_type is not None and group.finding_type.value == segment.type.value
        assert group.finding_category is not None and group.finding_category.value == segment.category.value
        assert group.reference_type == codes.DCM.ReferencedSegment
        ref = group.referenced_segment
        assert ref is not None
        assert ref[0].referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref[0].referenced_sop_class_uid == seg.SOPClassUID
        assert ref[0].referenced_segment_numbers == [measurement.segment_number]
        assert ref[1].value == sources[0].SeriesInstanceUID  # Source Series for Segmentation
        sites = group.finding_sites
        if segment.laterality is None:
            assert sites == []
        else:
            assert [site.laterality.value for site in sites if site.laterality] == [segment.laterality.value]

        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        (mean,) = group.get_measurements(name=codes.SCT.Mean)
        (sd,) = group.get_measurements(name=codes.SCT.StandardDeviation)
        assert len(group.get_measurements()) == 3
        assert volume.value == pytest.approx(measurement.volume_ml, rel=1e-15)
        assert mean.value == pytest.approx(measurement.mean, rel=1e-15)
        assert sd.value == pytest.approx(measurement.sd, rel=1e-15)
        assert (volume.unit.value, volume.unit.scheme_designator) == ("ml", "UCUM")
        assert mean.unit == HU and sd.unit == HU


def test_srread_reads_it(sr_bytes: bytes, tmp_path: Path) -> None:
    path = tmp_path / "sr.dcm"
    path.write_bytes(sr_bytes)
    assert isinstance(hd.sr.srread(path), hd.sr.Comprehensive3DSR)


def test_same_inputs_same_uids_new_version_new_uids(
    sources: list[pydicom.Dataset],
    seg: pydicom.Dataset,
    result_on_ct: ModelResult,
    measurements: list[SegmentMeasurement],
) -> None:
    a = build_sr(sources, result_on_ct, seg=seg, measurements=measurements, software_version=SOFTWARE_VERSION)
    b = build_sr(sources, result_on_ct, seg=seg, measurements=measurements, software_version=SOFTWARE_VERSION)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    v2 = replace(result_on_ct, model_version="1.0.1")
    seg2 = build_seg(sources, v2, software_version=SOFTWARE_VERSION)
    c = build_sr(sources, v2, seg=seg2, measurements=measurements, software_version=SOFTWARE_VERSION)
    assert c.SeriesInstanceUID != a.SeriesInstanceUID
    assert c.SOPInstanceUID != a.SOPInstanceUID
    assert c.SeriesInstanceUID != seg2.SeriesInstanceUID


def test_custom_procedure_reported(
    sources: list[pydicom.Dataset],
    seg: pydicom.Dataset,
    result_on_ct: ModelResult,
    measurements: list[SegmentMeasurement],
) -> None:
    chest = Code("24627-2", "LN", "CT Chest")
    ds = build_sr(
        sources, result_on_ct, seg=seg, measurements=measurements, software_version="x", procedure_reported=chest
    )
    codes_reported = [
        item.ConceptCodeSequence[0].CodeValue
        for item in ds.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"
    ]
    assert codes_reported == ["24627-2"]


def test_inconsistent_inputs_raise(
    sources: list[pydicom.Dataset],
    seg: pydicom.Dataset,
    result_on_ct: ModelResult,
    measurements: list[SegmentMeasurement],
) -> None:
    with pytest.raises(ValueError, match="measurements for"):
        build_sr(sources, result_on_ct, seg=seg, measurements=measurements[:-1], software_version="x")
    with pytest.raises(ValueError, match="does not match"):
        build_sr(sources, result_on_ct, seg=seg, measurements=list(reversed(measurements)), software_version="x")
    with pytest.raises(ValueError, match="Segmentation"):
        build_sr(sources, result_on_ct, seg=sources[0], measurements=measurements, software_version="x")
    renamed = replace(
        result_on_ct, segments=(replace(result_on_ct.segments[0], name="Trunk"), *result_on_ct.segments[1:])
    )
    renamed_measurements = [replace(measurements[0], name="Trunk"), *measurements[1:]]
    with pytest.raises(ValueError, match="seg segment 1"):
        build_sr(sources, renamed, seg=seg, measurements=renamed_measurements, software_version="x")


def test_all_empty_raises(
    sources: list[pydicom.Dataset],
    seg: pydicom.Dataset,
    result_on_ct: ModelResult,
    measurements: list[SegmentMeasurement],
) -> None:
    empty = [replace(m, voxel_count=0, volume_ml=0.0, mean=None, sd=None) for m in measurements]
    with pytest.raises(EmptyResultError, match="every segment is empty"):
        build_sr(sources, result_on_ct, seg=seg, measurements=empty, software_version="x")


def test_dciodvfy_no_errors(sr_bytes: bytes, tmp_path: Path) -> None:
    errors, _warnings = run_dciodvfy(sr_bytes, tmp_path, "sr.dcm")
    assert errors == []


def test_each_volume_is_inferred_from_a_point_inside_its_segment(
    sr_bytes: bytes, sources: list[pydicom.Dataset], result_on_ct: ModelResult
) -> None:
    """OHIF (3.12) needs image coordinates in every group: the Volume carries a SCOORD POINT that
    lies inside the segment on the source image it names."""
    ds = read_bytes(sr_bytes)
    by_uid = {str(s.SOPInstanceUID): k for k, s in enumerate(sources)}
    masks = {s.name: s.mask for s in result_on_ct.segments}
    checked = 0
    for container in ds.ContentSequence:
        for group in container.get("ContentSequence", []):
            items = group.get("ContentSequence", [])
            names = [i.TextValue for i in items if i.ConceptNameCodeSequence[0].CodeValue == "112039"]
            volumes = [i for i in items
                       if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "118565006"]
            if not names or not volumes:
                continue
            [scoord] = volumes[0].ContentSequence
            assert scoord.ValueType == "SCOORD" and scoord.GraphicType == "POINT"
            assert scoord.RelationshipType == "INFERRED FROM"
            [image] = scoord.ContentSequence
            k = by_uid[str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)]
            column, row = (float(v) for v in scoord.GraphicData)
            assert masks[names[0]][k, int(row), int(column)], names[0]
            checked += 1
    assert checked == sum(1 for s in result_on_ct.segments if s.mask.any()) > 0
