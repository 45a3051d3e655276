"""SEG encoder: round trip through bytes and highdicom, on the real CT geometry."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from models.base import ModelResult, Segment
from tests.unit.encode_helpers import (
    SCT_ANATOMICAL_STRUCTURE,
    SCT_BODY,
    box,
    ct_real_20_volume,
    load_ct_real_20,
    read_bytes,
    run_dciodvfy,
    synthetic_result,
    write_bytes,
)
from workers.encode.seg import PALETTE_RGB, EmptyResultError, build_seg
from workers.encode.uids import input_fingerprint, result_uids, segment_tracking_uid

SOFTWARE_VERSION = "0.1.0-test"


@pytest.fixture(scope="module")
def sources() -> list[pydicom.Dataset]:
    return load_ct_real_20()


@pytest.fixture(scope="module")
def result(sources: list[pydicom.Dataset]) -> ModelResult:
    return synthetic_result((len(sources), int(sources[0].Rows), int(sources[0].Columns)))


@pytest.fixture(scope="module")
def seg_bytes(sources: list[pydicom.Dataset], result: ModelResult) -> bytes:
    return write_bytes(build_seg(sources, result, software_version=SOFTWARE_VERSION))


@pytest.fixture(scope="module")
def seg(seg_bytes: bytes) -> hd.seg.Segmentation:
    return hd.seg.Segmentation.from_dataset(read_bytes(seg_bytes))


def test_sources_are_in_k_order_reverse_of_file_order(sources: list[pydicom.Dataset]) -> None:
    """Guards the test premise: k order is ascending z here, i.e. descending instance number."""
    z = [float(ds.ImagePositionPatient[2]) for ds in sources]
    assert z == sorted(z)
    numbers = [int(ds.InstanceNumber) for ds in sources]
    assert numbers == sorted(numbers, reverse=True)
    assert sources[0].file_meta.TransferSyntaxUID == JPEG2000Lossless


def test_header(seg: hd.seg.Segmentation, sources: list[pydicom.Dataset], result: ModelResult) -> None:
    fingerprint = input_fingerprint(ds.SOPInstanceUID for ds in sources)
    uids = result_uids(sources[0].SeriesInstanceUID, result.model_name, result.model_version, "SEG", fingerprint)
    assert seg.SeriesInstanceUID == uids.series_uid
    assert seg.SOPInstanceUID == uids.sop_instance_uid
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.Modality == "SEG"
    assert seg.SeriesNumber == 900
    assert seg.SeriesDescription == f"AI SEG {result.model_name}"
    assert seg.Manufacturer == "dicom-ai-node"
    assert seg.ManufacturerModelName == result.model_name
    assert seg.SoftwareVersions == SOFTWARE_VERSION
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.PatientID == sources[0].PatientID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.SegmentationType == "BINARY"
    assert seg.SegmentsOverlap == "YES"  # Body contains the lungs
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    referenced = {item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence}
    assert referenced == {sources[0].SeriesInstanceUID}


def test_segment_descriptions(
    seg: hd.seg.Segmentation, sources: list[pydicom.Dataset], result: ModelResult
) -> None:
    assert seg.segment_numbers == [1, 2, 3, 4]
    for number, segment in enumerate(result.segments, start=1):
        desc = seg.get_segment_description(number)
        assert desc.segment_label == segment.name
        category, prop_type = desc.segmented_property_category, desc.segmented_property_type
        assert (category.value, category.scheme_designator, category.meaning) == (
            segment.category.value,
            segment.category.scheme,
            segment.category.meaning,
        )
        assert (prop_type.value, prop_type.scheme_designator, prop_type.meaning) == (
            segment.type.value,
            segment.type.scheme,
            segment.type.meaning,
        )
        modifiers = desc.SegmentedPropertyTypeCodeSequence[0].get("SegmentedPropertyTypeModifierCodeSequence")
        if segment.laterality is None:
            assert modifiers is None
        else:
            assert [m.CodeValue for m in modifiers] == [segment.laterality.value]
        assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        assert desc.algorithm_identification is not None
        algorithm = desc.algorithm_identification[0]
        assert algorithm.AlgorithmName == result.model_name
        assert algorithm.AlgorithmVersion == result.model_version
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        ai_family = ("123110", "DCM")  # Artificial Intelligence (CID 7162)
        assert (family.CodeValue, family.CodingSchemeDesignator) == ai_family
        assert desc.tracking_id == segment.name
        assert desc.tracking_uid == segment_tracking_uid(
            sources[0].SeriesInstanceUID, result.model_name, segment.name
        )
        expected_lab = hd.color.CIELabColor.from_rgb(*PALETTE_RGB[number - 1]).value
        assert tuple(desc.RecommendedDisplayCIELabValue) == expected_lab


def test_pixels_by_source_instance_equal_masks(
    seg: hd.seg.Segmentation, sources: list[pydicom.Dataset], result: ModelResult
) -> None:
    pixels = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in sources],  # k order
        assert_missing_frames_are_empty=True,  # omitted (empty) frames read back as zeros
    )
    assert pixels.shape == (len(sources), sources[0].Rows, sources[0].Columns, len(result.segments))
    for index, segment in enumerate(result.segments):
        np.testing.assert_array_equal(pixels[..., index].astype(bool), segment.mask, err_msg=segment.name)


def test_volume_on_source_geometry_equals_masks(seg: hd.seg.Segmentation, result: ModelResult) -> None:
    """Independent of source UIDs: the frames' plane positions put each mask slice back at its k."""
    volume = ct_real_20_volume()
    # highdicom's affine indexes (slice, row, column) = (k, j, i); ours indexes (i, j, k).
    geometry = hd.VolumeGeometry(
        volume.affine[:, [2, 1, 0, 3]],
        volume.voxels.shape,
        "PATIENT",
        frame_of_reference_uid=volume.frame_of_reference_uid,
    )
    matched = seg.get_volume().match_geometry(geometry)
    # The channel comes back as ReferencedSegmentNumber (the constructor wants "SegmentNumber").
    assert matched.get_channel_values("ReferencedSegmentNumber") == [1, 2, 3, 4]
    for index, segment in enumerate(result.segments):
        np.testing.assert_array_equal(
            matched.array[..., index].astype(bool), segment.mask, err_msg=segment.name
        )


def test_empty_frames_omitted_and_empty_segment_kept(seg: hd.seg.Segmentation, result: ModelResult) -> None:
    expected_frames = sum(int(s.mask.any(axis=(1, 2)).sum()) for s in result.segments)
    assert seg.NumberOfFrames == expected_frames
    frame_segments = [
        int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for item in seg.PerFrameFunctionalGroupsSequence
    ]
    empty_number = [s.name for s in result.segments].index("Nodule") + 1
    assert not result.segments[empty_number - 1].mask.any()
    assert empty_number in seg.segment_numbers
    assert empty_number not in frame_segments


def test_single_slice_mask_references_its_source(sources: list[pydicom.Dataset]) -> None:
    """A mask on k=0 only must land on sources[0] (lowest z, the LAST file by instance number)."""
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    mask = box(shape, (0, 100, 100), (1, 120, 130))
    result = ModelResult("one-slice", "1", (Segment("Body", SCT_ANATOMICAL_STRUCTURE, SCT_BODY, mask),))
    seg = read_bytes(write_bytes(build_seg(sources, result, software_version=SOFTWARE_VERSION)))
    assert seg.NumberOfFrames == 1
    frame = seg.PerFrameFunctionalGroupsSequence[0]
    source_ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
    assert source_ref.ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
    position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
    np.testing.assert_allclose(position, [float(v) for v in sources[0].ImagePositionPatient])


def test_jpeg2000_round_trip(sources: list[pydicom.Dataset], result: ModelResult, tmp_path: Path) -> None:
    data = write_bytes(
        build_seg(sources, result, software_version=SOFTWARE_VERSION, transfer_syntax_uid=JPEG2000Lossless)
    )
    errors, _warnings = run_dciodvfy(data, tmp_path, "seg-j2k.dcm")
    assert errors == []
    seg = hd.seg.Segmentation.from_dataset(read_bytes(data))
    assert seg.file_meta.TransferSyntaxUID == JPEG2000Lossless
    pixels = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in sources], assert_missing_frames_are_empty=True
    )
    for index, segment in enumerate(result.segments):
        np.testing.assert_array_equal(pixels[..., index].astype(bool), segment.mask, err_msg=segment.name)


def test_headers_only_sources_give_the_same_object(
    sources: list[pydicom.Dataset], result: ModelResult
) -> None:
    headers = [pydicom.dcmread(ds.filename, stop_before_pixels=True) for ds in sources]
    a = build_seg(sources, result, software_version=SOFTWARE_VERSION)
    b = build_seg(headers, result, software_version=SOFTWARE_VERSION)
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert a.PixelData == b.PixelData


def test_same_inputs_same_uids_new_version_new_uids(
    sources: list[pydicom.Dataset], result: ModelResult
) -> None:
    a = build_seg(sources, result, software_version=SOFTWARE_VERSION)
    b = build_seg(sources, result, software_version=SOFTWARE_VERSION)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    c = build_seg(sources, replace(result, model_version="1.0.1"), software_version=SOFTWARE_VERSION)
    assert c.SeriesInstanceUID != a.SeriesInstanceUID
    assert c.SOPInstanceUID != a.SOPInstanceUID
    # tracking UIDs follow the structure across model versions
    assert [d.TrackingUID for d in c.SegmentSequence] == [d.TrackingUID for d in a.SegmentSequence]


def _with_mask(result: ModelResult, index: int, mask: np.ndarray) -> ModelResult:
    segments = list(result.segments)
    segments[index] = replace(segments[index], mask=mask)
    return replace(result, segments=tuple(segments))


@pytest.mark.parametrize(
    "shape",
    [(19, 512, 512), (21, 512, 512), (20, 256, 512), (20, 512, 511), (512, 512)],
    ids=["fewer-frames", "more-frames", "rows", "columns", "2d"],
)
def test_mismatched_mask_shape_raises(
    sources: list[pydicom.Dataset], result: ModelResult, shape: tuple[int, ...]
) -> None:
    bad = _with_mask(result, 1, np.ones(shape, dtype=bool))
    with pytest.raises(ValueError, match="does not match the sources"):
        build_seg(sources, bad, software_version=SOFTWARE_VERSION)


def test_invalid_inputs_raise(sources: list[pydicom.Dataset], result: ModelResult) -> None:
    shape = result.segments[0].mask.shape
    with pytest.raises(ValueError, match="boolean"):
        build_seg(sources, _with_mask(result, 0, np.ones(shape, dtype=np.uint8)), software_version="x")
    with pytest.raises(ValueError, match="duplicate"):
        dup = replace(result, segments=(result.segments[0], result.segments[0]))
        build_seg(sources, dup, software_version="x")
    with pytest.raises(ValueError, match="no segments"):
        build_seg(sources, replace(result, segments=()), software_version="x")
    with pytest.raises(ValueError, match="source"):
        build_seg([], result, software_version="x")
    with pytest.raises(ValueError, match="not allowed for a BINARY SEG"):
        build_seg(sources, result, software_version="x", transfer_syntax_uid=RLELossless)


def test_all_segments_empty_raises(sources: list[pydicom.Dataset], result: ModelResult) -> None:
    empty = replace(result, segments=tuple(replace(s, mask=np.zeros_like(s.mask)) for s in result.segments))
    with pytest.raises(EmptyResultError, match="every segment is empty"):
        build_seg(sources, empty, software_version=SOFTWARE_VERSION)


def test_dciodvfy_no_errors(seg_bytes: bytes, tmp_path: Path) -> None:
    errors, _warnings = run_dciodvfy(seg_bytes, tmp_path, "seg.dcm")
    assert errors == []
