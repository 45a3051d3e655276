"""workers.load on multi-frame images: Legacy Converted Enhanced CT/MR and Enhanced CT.

A series stored as one multi-frame instance must load exactly as the same series stored slice by
slice (voxels, affine, k order), whatever the frame order in the file.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from models import registry
from models.base import Code, Detection, ModelResult, UnsuitableInput, Volume
from models.errors import UnreadableInput
from testkit.dicom import phantom_truth_in_volume_order, write_ct_series, written_affine
from testkit.phantom import make_ct_phantom, phantom_uid
from tests.unit.encode_helpers import run_dciodvfy
from workers.encode.seg import build_seg
from workers.encode.sr import build_sr
from workers.load import load_series, mask_to_frame_order, volume_from_datasets

PHANTOM = make_ct_phantom(n_slices=12, rows=64, cols=64, pixel_mm=6.0, slice_mm=2.5, seed=4)
SCT_NODULE = Code("27925004", "SCT", "Nodule")


def _convert(datasets: Sequence[Dataset], modality: str = "CT", seed: str = "mf") -> Dataset:
    """One Legacy Converted Enhanced image of ``datasets``, frames in the given order, read back from bytes."""
    cls = hd.legacy.LegacyConvertedEnhancedCTImage if modality == "CT" else hd.legacy.LegacyConvertedEnhancedMRImage
    mf = cls(
        list(datasets),
        series_instance_uid=phantom_uid(seed, "series"),
        series_number=99,
        sop_instance_uid=phantom_uid(seed, "sop"),
        instance_number=1,
        include_dimension_index=False,  # keep the frame order we give
    )
    return _roundtrip(mf)


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _roundtrip(ds: Dataset) -> Dataset:
    return pydicom.dcmread(io.BytesIO(_bytes(ds)))


def _converted_from(mf: Dataset, frame: int) -> str:
    """SOP Instance UID of the single-frame image frame ``frame`` (1-based) was converted from."""
    item = mf.PerFrameFunctionalGroupsSequence[frame - 1].ConversionSourceAttributesSequence[0]
    return str(item.ReferencedSOPInstanceUID)


def _assert_same_volume(single: tuple[Volume, list[Dataset]], multi: tuple[Volume, list[Dataset]]) -> None:
    (sv, sources), (mv, msources) = single, multi
    np.testing.assert_allclose(mv.affine, sv.affine, atol=1e-6)
    np.testing.assert_array_equal(mv.voxels, sv.voxels)
    assert mv.voxels.dtype == np.float32
    assert mv.modality == sv.modality and mv.frame_of_reference_uid == sv.frame_of_reference_uid
    assert len(msources) == 1 and mv.sop_instance_uids == (str(msources[0].SOPInstanceUID),) * len(sources)
    assert mv.source_frames is not None and sv.source_frames is None
    # frame source_frames[k] holds the slice the single-frame loader put at k
    assert [_converted_from(msources[0], f) for f in mv.source_frames] == [str(d.SOPInstanceUID) for d in sources]


@pytest.mark.parametrize(("flip_rows", "flip_cols", "reverse"), [(False, False, False), (True, False, True),
                                                                 (False, True, False), (True, True, True)])
def test_legacy_ct_loads_like_the_single_frame_series(tmp_path: Path, flip_rows: bool, flip_cols: bool,
                                                      reverse: bool) -> None:
    files = write_ct_series(PHANTOM, tmp_path / "sf", flip_rows=flip_rows, flip_cols=flip_cols,
                            reverse_slices=reverse)
    single = load_series(files)
    mf = _convert([pydicom.dcmread(f) for f in files])  # instance order: head first when reversed
    path = tmp_path / "mf.dcm"
    dcmwrite(path, mf, enforce_file_format=True)
    multi = load_series([path])
    _assert_same_volume(single, multi)
    volume = multi[0]
    np.testing.assert_allclose(volume.affine, written_affine(PHANTOM, flip_rows=flip_rows, flip_cols=flip_cols),
                               atol=1e-6)
    assert volume.spacing == pytest.approx((2.5, 6.0, 6.0))
    lung = phantom_truth_in_volume_order(PHANTOM, "Left Lung", flip_rows=flip_rows, flip_cols=flip_cols)
    assert volume.voxels[lung].mean() < -700  # HU: the shared rescale was applied
    n = PHANTOM.shape[0]
    stored_ascending = not (reverse ^ (flip_rows ^ flip_cols))  # the normal flips with one in-plane flip
    assert volume.source_frames == (tuple(range(1, n + 1)) if stored_ascending else tuple(range(n, 0, -1)))


def test_frames_stored_in_any_order(tmp_path: Path) -> None:
    files = write_ct_series(PHANTOM, tmp_path)
    datasets = [pydicom.dcmread(f) for f in files]
    perm = np.random.default_rng(7).permutation(len(datasets))
    multi = volume_from_datasets([_convert([datasets[i] for i in perm])])
    _assert_same_volume(load_series(files), multi)
    assert multi[0].source_frames == tuple(int(np.argwhere(perm == k)[0, 0]) + 1 for k in range(len(datasets)))


def _to_enhanced_ct_with_per_frame_rescale(mf: Dataset) -> Dataset:
    """A true Enhanced CT Image variant: per-frame Pixel Value Transformation, each frame its own rescale."""
    ds = copy.deepcopy(mf)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    shared = ds.SharedFunctionalGroupsSequence[0]
    transform = shared.PixelValueTransformationSequence[0]
    slope0, intercept0 = float(transform.RescaleSlope), float(transform.RescaleIntercept)
    del shared.PixelValueTransformationSequence
    pixels = ds.pixel_array.astype(np.float64) * slope0 + intercept0  # HU
    stored = np.empty(pixels.shape, dtype=np.uint16)
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        slope, intercept = (0.5, -1024.0 - 3 * f) if f % 2 else (1.0, -1040.0 - f)
        stored[f] = np.rint((pixels[f] - intercept) / slope).astype(np.uint16)
        t = Dataset()
        t.RescaleSlope, t.RescaleIntercept, t.RescaleType = f"{slope:g}", f"{intercept:g}", "HU"
        item.PixelValueTransformationSequence = DicomSequence([t])
    ds.BitsStored, ds.HighBit = 16, 15
    ds.PixelData = stored.tobytes()
    return _roundtrip(ds)


def test_enhanced_ct_with_per_frame_rescale(tmp_path: Path) -> None:
    files = write_ct_series(PHANTOM, tmp_path, reverse_slices=True)
    datasets = [pydicom.dcmread(f) for f in files]
    perm = np.random.default_rng(3).permutation(len(datasets))
    enhanced = _to_enhanced_ct_with_per_frame_rescale(_convert([datasets[i] for i in perm]))
    assert "PixelValueTransformationSequence" in enhanced.PerFrameFunctionalGroupsSequence[1]
    _assert_same_volume(load_series(files), volume_from_datasets([enhanced]))


def write_mr_series(out: Path, n: int = 9, rows: int = 40, cols: int = 48, *, oblique: bool = True) -> list[Path]:
    """A small synthetic single-frame MR series (sagittal, optionally tilted), no rescale."""
    out.mkdir(parents=True, exist_ok=True)
    angle = np.deg2rad(12.0 if oblique else 0.0)
    row = np.array([0.0, np.cos(angle), -np.sin(angle)])  # anterior -> posterior, tilted
    col = np.array([0.0, np.sin(angle), np.cos(angle)])  # head -> feet... tilted
    col = -col
    normal = np.cross(row, col)
    rng = np.random.default_rng(11)
    paths = []
    study, series, frame_ref = (phantom_uid("mr", part) for part in ("study", "series", "for"))
    for k in range(n):
        ds = Dataset()
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = phantom_uid("mr", "sop", str(k))
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^MR", "MR-1", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_ref
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = (
            "20240101", "120000", "", "1", "")
        ds.ContentDate, ds.ContentTime = "20240101", "120000"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 3, n - k
        ds.PositionReferenceIndicator, ds.Manufacturer = "", "dicom-ai-node"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength, ds.MagneticFieldStrength = "500", "15", 1, "1.5"
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in np.array([-20.0, -60.0, 80.0]) + normal * 4.0 * k]
        ds.PixelSpacing, ds.SliceThickness = ["1.5", "1.25"], "4"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
            rows, cols, 16, 12, 11, 0)
        ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out / f"MR{n - k:03d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return sorted(paths)


def test_legacy_mr_oblique_without_rescale(tmp_path: Path) -> None:
    files = write_mr_series(tmp_path)
    single = load_series(files)
    datasets = [pydicom.dcmread(f) for f in files]
    perm = np.random.default_rng(5).permutation(len(datasets))
    mf = _convert([datasets[i] for i in perm], modality="MR")
    assert mf.SOPClassUID == pydicom.uid.LegacyConvertedEnhancedMRImageStorage
    del mf.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence  # identity anyway; test absence
    multi = volume_from_datasets([mf])
    _assert_same_volume(single, multi)
    volume = multi[0]
    assert volume.modality == "MR" and volume.spacing == pytest.approx((4.0, 1.5, 1.25))
    raw = mf.pixel_array
    assert volume.source_frames is not None
    np.testing.assert_array_equal(volume.voxels, raw[np.array(volume.source_frames) - 1])  # no rescale


# --- refusals --------------------------------------------------------------------------------------


@pytest.fixture
def ct_mf(tmp_path: Path) -> tuple[Dataset, list[Dataset]]:
    files = write_ct_series(PHANTOM, tmp_path)
    datasets: list[Dataset] = [pydicom.dcmread(f) for f in files]
    return _convert(datasets), list(datasets)


def _position(ds: Dataset, frame: int) -> Dataset:
    item: Dataset = ds.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSequence[0]
    return item


def test_mixed_or_several_multiframe_instances_are_refused(ct_mf: tuple[Dataset, list[Dataset]]) -> None:
    mf, single = ct_mf
    with pytest.raises(UnsuitableInput, match="mixes multi-frame and single-frame"):
        volume_from_datasets([mf, *single])
    other = copy.deepcopy(mf)
    other.SOPInstanceUID = phantom_uid("other", "sop")
    with pytest.raises(UnsuitableInput, match="2 multi-frame images"):
        volume_from_datasets([mf, other])


def test_duplicate_positions_and_irregular_spacing_are_refused(ct_mf: tuple[Dataset, list[Dataset]]) -> None:
    mf, _ = ct_mf
    dup = copy.deepcopy(mf)
    _position(dup, 4).ImagePositionPatient = _position(dup, 3).ImagePositionPatient
    with pytest.raises(UnsuitableInput, match="share one position"):
        volume_from_datasets([dup])
    gap = copy.deepcopy(mf)
    x, y, z = (float(v) for v in _position(gap, 5).ImagePositionPatient)
    _position(gap, 5).ImagePositionPatient = [x, y, z + 1.0]
    with pytest.raises(UnsuitableInput, match="irregular frame spacing"):
        volume_from_datasets([gap])


def test_per_frame_orientation_and_spacing_must_agree(ct_mf: tuple[Dataset, list[Dataset]]) -> None:
    mf, _ = ct_mf
    ds = copy.deepcopy(mf)
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation, measures = shared.PlaneOrientationSequence, shared.PixelMeasuresSequence
    del shared.PlaneOrientationSequence, shared.PixelMeasuresSequence
    for item in ds.PerFrameFunctionalGroupsSequence:  # per-frame macros, as Enhanced MR often has them
        item.PlaneOrientationSequence = copy.deepcopy(orientation)
        item.PixelMeasuresSequence = copy.deepcopy(measures)
    volume, _ = volume_from_datasets([ds])  # per-frame is fine when consistent
    np.testing.assert_allclose(volume.affine, written_affine(PHANTOM), atol=1e-6)
    tilted = copy.deepcopy(ds)
    tilted.PerFrameFunctionalGroupsSequence[2].PlaneOrientationSequence[0].ImageOrientationPatient = [
        1, 0, 0, 0, 0, -1]
    with pytest.raises(UnsuitableInput, match="different orientations"):
        volume_from_datasets([tilted])
    zoomed = copy.deepcopy(ds)
    zoomed.PerFrameFunctionalGroupsSequence[2].PixelMeasuresSequence[0].PixelSpacing = [3, 3]
    with pytest.raises(UnsuitableInput, match="different pixel spacings"):
        volume_from_datasets([zoomed])


def test_missing_geometry_is_refused(ct_mf: tuple[Dataset, list[Dataset]]) -> None:
    mf, _ = ct_mf
    ds = copy.deepcopy(mf)
    del ds.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence
    with pytest.raises(UnreadableInput, match="Plane Orientation/Position"):
        volume_from_datasets([ds])
    ds = copy.deepcopy(mf)
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    with pytest.raises(UnreadableInput, match="Pixel Spacing missing"):
        volume_from_datasets([ds])
    plain = copy.deepcopy(mf)  # e.g. a multi-frame secondary capture: no functional groups
    del plain.PerFrameFunctionalGroupsSequence, plain.SharedFunctionalGroupsSequence
    with pytest.raises(UnreadableInput, match="without functional groups"):
        volume_from_datasets([plain])
    short = copy.deepcopy(mf)
    del short.PerFrameFunctionalGroupsSequence[-1]
    with pytest.raises(UnreadableInput, match="per-frame functional group items"):
        volume_from_datasets([short])


# --- helpers for the encoders ------------------------------------------------------------------------


def test_mask_to_frame_order() -> None:
    mask = np.arange(4 * 2 * 3).reshape(4, 2, 3)
    frames = (3, 1, 4, 2)  # slice k is frame frames[k]
    out = mask_to_frame_order(mask, frames)
    for k, f in enumerate(frames):
        np.testing.assert_array_equal(out[f - 1], mask[k])
    stacked = np.stack([mask, -mask], axis=-1)  # trailing axes follow
    np.testing.assert_array_equal(mask_to_frame_order(stacked, frames)[..., 1], -out)
    for bad in ((1, 2, 3), (1, 2, 3, 3), (0, 1, 2, 3)):
        with pytest.raises(ValueError, match="permutation"):
            mask_to_frame_order(mask, bad)


def test_volume_validates_source_frames() -> None:
    kw = {"voxels": np.zeros((3, 2, 2), np.float32), "affine": np.eye(4), "modality": "CT",
          "sop_instance_uids": ("1.2",) * 3, "frame_of_reference_uid": "1.3"}
    assert Volume(**kw, source_frames=(2, 3, 1)).source_frames == (2, 3, 1)  # type: ignore[arg-type]
    for bad in ((1, 2), (1, 2, 2), (0, 1, 2)):
        with pytest.raises(ValueError, match="permutation"):
            Volume(**kw, source_frames=bad)  # type: ignore[arg-type]


def test_seg_and_sr_reference_the_frames(tmp_path: Path) -> None:
    """SEG frames and the SR's SCOORD land on the right frames of a reversed, shuffled multi-frame CT."""
    files = write_ct_series(PHANTOM, tmp_path, reverse_slices=True)
    datasets = [pydicom.dcmread(f) for f in files]
    perm = np.random.default_rng(1).permutation(len(datasets))
    mf = _convert([datasets[i] for i in perm])
    volume, sources = volume_from_datasets([mf])
    assert volume.source_frames is not None
    result = registry.load("ct-hu-segmentation").run(volume)
    seg = build_seg(sources, result, software_version="test", source_frames=volume.source_frames)
    assert run_dciodvfy(_bytes(seg), tmp_path, "seg.dcm")[0] == []
    seg_hd = hd.seg.Segmentation.from_dataset(_roundtrip(seg))
    numbers = seg_hd.get_segment_numbers()
    pixels = seg_hd.get_pixels_by_source_frame(
        source_sop_instance_uid=str(mf.SOPInstanceUID), source_frame_numbers=list(volume.source_frames),
        segment_numbers=numbers, combine_segments=False, assert_missing_frames_are_empty=True)
    for i, n in enumerate(numbers):  # read back in k order = the model's masks
        name = seg_hd.get_segment_description(n).segment_label
        np.testing.assert_array_equal(pixels[..., i] > 0, next(s.mask for s in result.segments if s.name == name))
    lung = phantom_truth_in_volume_order(PHANTOM, "Left Lung")
    mask = next(s.mask for s in result.segments if s.name == "Left Lung")
    assert 2 * (mask & lung).sum() / (mask.sum() + lung.sum()) > 0.9

    k = 7
    x, y, z = (float(v) for v in volume.to_patient([30.2, 20.0, k + 0.3]))
    detection = Detection("Nodule 1", SCT_NODULE, (30.2, 20.0, k + 0.3), (x, y, z), (28, 18, k), (32, 22, k),
                          8.0, 0.8, "Nodule 1")
    nodules = ModelResult("test-nodules", "1", detections=(detection,))
    with pytest.raises(ValueError, match="source_frames"):
        build_sr(sources, nodules, software_version="test")
    sr = build_sr(sources, nodules, software_version="test", source_frames=volume.source_frames)
    assert run_dciodvfy(_bytes(sr), tmp_path, "sr.dcm")[0] == []
    report = hd.sr.Comprehensive3DSR.from_dataset(_roundtrip(sr)).content
    assert isinstance(report, hd.sr.MeasurementReport)
    [group] = report.get_planar_roi_measurement_groups()
    assert isinstance(group.roi, hd.sr.ImageRegion)
    [image] = group.roi.ContentSequence[0].ReferencedSOPSequence
    assert image.ReferencedSOPInstanceUID == mf.SOPInstanceUID
    assert image.ReferencedSOPClassUID == mf.SOPClassUID
    assert image.ReferencedFrameNumber == volume.source_frames[k]
    z = float(_position(mf, int(image.ReferencedFrameNumber)).ImagePositionPatient[2])
    assert z == pytest.approx(float(volume.to_patient([0, 0, k])[2]))  # the frame is slice k
