"""Key images (Secondary Capture): round trip through bytes, the picture shows the findings, UIDs, dciodvfy."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest

from models.base import ModelResult, Registration, Segment, Volume
from testkit.dicom import write_ct_series
from testkit.phantom import Phantom, make_ct_phantom
from tests.unit.encode_helpers import (
    SCT_ANATOMICAL_STRUCTURE,
    SCT_BODY,
    SCT_LEFT,
    SCT_LUNG,
    SCT_RIGHT,
    ct_real_20_volume,
    detection_at,
    emphysema_classification,
    load_ct_real_20,
    read_bytes,
    run_dciodvfy,
    sort_by_normal,
    synthetic_result,
    volume_from_datasets,
    write_bytes,
)
from workers.encode.render import DETECTION_RGB, LUNG_WINDOW, SOFT_TISSUE_WINDOW, outline, window_slice
from workers.encode.sc import build_key_images
from workers.encode.seg import PALETTE_RGB, EmptyResultError
from workers.encode.series import series_description, series_number

SOFTWARE_VERSION = "0.1.0-test"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
Series = tuple[list[pydicom.Dataset], Volume, Phantom]


def phantom_series(out_dir: Path) -> Series:
    """A small synthetic chest CT written as DICOM (128x128: rendered at scale 3) and read back in k order."""
    phantom = make_ct_phantom(40, 128, 128, pixel_mm=2.5, slice_mm=5.0, nodules=3, seed=3)
    paths = write_ct_series(phantom, out_dir)
    sources = sort_by_normal([pydicom.dcmread(p) for p in paths])
    return sources, volume_from_datasets(sources), phantom


def phantom_results(volume: Volume, phantom: Phantom) -> dict[str, ModelResult]:
    """One result per family on the phantom: segmentation, detection, classification, registration."""
    segments = (
        Segment("Body", SCT_ANATOMICAL_STRUCTURE, SCT_BODY, phantom.truth("Body")),
        Segment("Right Lung", SCT_ANATOMICAL_STRUCTURE, SCT_LUNG, phantom.truth("Right Lung"), SCT_RIGHT),
        Segment("Left Lung", SCT_ANATOMICAL_STRUCTURE, SCT_LUNG, phantom.truth("Left Lung"), SCT_LEFT),
    )
    inverse = np.linalg.inv(volume.affine)
    detections = []
    for number, nodule in enumerate(phantom.nodules, start=1):
        i, j, k = (float(v) for v in (inverse @ np.array([*nodule.center_lps, 1.0]))[:3])
        detections.append(detection_at(volume, number, (i, j, k), nodule.diameter_mm, 0.95 - 0.1 * number))
    registration = Registration(
        transform=np.eye(4), residual_mm=1.25, metric_value=-0.5,
        resampled=np.roll(volume.voxels, 4, axis=2), prior_frame_of_reference_uid="2.25.1234",
    )
    return {
        "segmentation": ModelResult("ct-hu-segmentation", "1.0.0", segments=segments),
        "detection": ModelResult("ct-lung-nodules", "1.0.0", detections=tuple(detections)),
        "classification": ModelResult("ct-emphysema", "1.0.0", classifications=(emphysema_classification(),)),
        "registration": ModelResult("ct-registration", "1.0.0", registration=registration),
    }


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Series:
    return phantom_series(tmp_path_factory.mktemp("phantom-ct"))


@pytest.fixture(scope="module")
def real() -> tuple[list[pydicom.Dataset], Volume]:
    return load_ct_real_20(), ct_real_20_volume()


def round_trip(images: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    return [read_bytes(write_bytes(ds)) for ds in images]


def source_index(ds: pydicom.Dataset, sources: list[pydicom.Dataset]) -> int:
    """k of the source slice an SC image references."""
    (item,) = ds.SourceImageSequence
    assert item.ReferencedSOPClassUID == sources[0].SOPClassUID
    assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    return [s.SOPInstanceUID for s in sources].index(item.ReferencedSOPInstanceUID)


def picture(ds: pydicom.Dataset, rows: int, cols: int, scale: int) -> npt.NDArray[np.uint8]:
    """The image region (legend band cut off), back at the source pixel grid."""
    pixels = ds.pixel_array
    assert pixels.shape == (int(ds.Rows), int(ds.Columns), 3) and pixels.dtype == np.uint8
    return np.asarray(pixels[: rows * scale : scale, : cols * scale : scale], dtype=np.uint8)


def test_segmentation_images_show_the_outlines(real: tuple[list[pydicom.Dataset], Volume], tmp_path: Path) -> None:
    sources, volume = real
    result = synthetic_result(volume.voxels.shape)  # Body, Right lung, Left lung, empty Nodule
    images = round_trip(build_key_images(sources, volume, result, software_version=SOFTWARE_VERSION))
    assert 1 <= len(images) <= 4
    rows, cols = volume.voxels.shape[1:]
    for number, ds in enumerate(images, start=1):
        assert ds.SOPClassUID == SC_STORAGE == ds.file_meta.MediaStorageSOPClassUID
        assert (ds.Modality, ds.InstanceNumber) == ("OT", number)
        assert (ds.ConversionType, ds.BurnedInAnnotation) == ("WSD", "YES")
        assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.BitsAllocated) == ("RGB", 3, 8)
        assert int(ds.Columns) == cols and int(ds.Rows) > rows  # legend band below the slice
        assert (ds.SeriesNumber, ds.SeriesDescription) == (series_number("SC"), series_description("SC", "test-lungs"))
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyID", "AccessionNumber", "StudyDate"):
            assert ds[keyword].value == sources[0][keyword].value, keyword
        assert [float(v) for v in ds.PixelSpacing] == [float(v) for v in sources[0].PixelSpacing]
        assert list(ds.PatientOrientation) == ["L", "P"]
        k = source_index(ds, sources)
        image = picture(ds, rows, cols, 1)
        drawn = np.zeros((rows, cols), dtype=bool)
        for index, segment in enumerate(result.segments):
            border = outline(segment.mask[k])
            assert (image[border] == PALETTE_RGB[index]).all(), segment.name
            drawn |= border
        assert drawn.any(), "the key slice shows segments"
        # Everywhere else: the source slice itself, in the lung window, neither flipped nor shifted.
        grey = window_slice(volume.voxels[k], LUNG_WINDOW)
        np.testing.assert_array_equal(image[~drawn], np.repeat(grey[~drawn][:, None], 3, axis=1))
    # The first image is the slice with the largest segmented area.
    areas = sum(np.count_nonzero(s.mask.reshape(len(sources), -1), axis=1) for s in result.segments)
    assert areas[source_index(images[0], sources)] >= 0.98 * areas.max()
    errors, warnings = run_dciodvfy(write_bytes(images[0]), tmp_path, "sc-real.dcm")
    assert errors == []
    # The real CT's Body Part Examined (PARTIALBODY) is not a defined term, so Laterality is written empty.
    assert len(warnings) == 2 and "Laterality" in warnings[0] and "PARTIALBODY" in warnings[1]


def test_uids_are_deterministic_and_follow_the_input(real: tuple[list[pydicom.Dataset], Volume]) -> None:
    sources, volume = real
    result = synthetic_result(volume.voxels.shape)
    first = build_key_images(sources, volume, result, software_version=SOFTWARE_VERSION)
    again = build_key_images(sources, volume, result, software_version=SOFTWARE_VERSION)
    assert [d.SOPInstanceUID for d in first] == [d.SOPInstanceUID for d in again]
    assert len({d.SOPInstanceUID for d in first}) == len(first)
    assert {d.SeriesInstanceUID for d in first} == {again[0].SeriesInstanceUID}
    changed = list(sources)
    changed[3] = copy.deepcopy(sources[3])
    changed[3].SOPInstanceUID = changed[3].SOPInstanceUID + ".9"
    other = build_key_images(changed, volume, result, software_version=SOFTWARE_VERSION)
    assert other[0].SeriesInstanceUID == first[0].SeriesInstanceUID
    assert not {d.SOPInstanceUID for d in other} & {d.SOPInstanceUID for d in first}


@pytest.mark.parametrize("family", ["segmentation", "detection", "classification", "registration"])
def test_every_family_is_valid_dicom(phantom: Series, family: str, tmp_path: Path) -> None:
    sources, volume, ph = phantom
    result = phantom_results(volume, ph)[family]
    images = round_trip(build_key_images(sources, volume, result, software_version=SOFTWARE_VERSION))
    assert images
    for index, ds in enumerate(images):
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([2.5 / 3, 2.5 / 3])  # 128 px drawn 3x
        assert (ds.BodyPartExamined, "Laterality" in ds) == ("CHEST", False)
        errors, warnings = run_dciodvfy(write_bytes(ds), tmp_path, f"sc-{family}-{index}.dcm")
        assert errors == [] and warnings == []


def test_detections_are_circled_on_their_centre_slice(phantom: Series) -> None:
    sources, volume, ph = phantom
    result = phantom_results(volume, ph)["detection"]
    images = round_trip(build_key_images(sources, volume, result, software_version=SOFTWARE_VERSION))
    rows, cols = volume.voxels.shape[1:]
    shown = set()
    for ds in images:
        k = source_index(ds, sources)
        image = np.asarray(ds.pixel_array[: rows * 3, : cols * 3])
        yellow = np.all(image == DETECTION_RGB, axis=2)
        for number, det in enumerate(result.detections, start=1):
            if not det.bbox_ijk_min[2] <= k <= det.bbox_ijk_max[2]:
                continue
            shown.add(number)
            x, y = (det.centre_ijk[0] + 0.5) * 3, (det.centre_ijk[1] + 0.5) * 3
            r = det.diameter_mm / 2 / 2.5 * 3 + 4 - 1  # the 2-pixel line lies inside the circle's box
            on_ring = [
                yellow[round(y + r * np.sin(a)) - 1 : round(y + r * np.sin(a)) + 2,
                       round(x + r * np.cos(a)) - 1 : round(x + r * np.cos(a)) + 2].any()
                for a in np.linspace(0, 2 * np.pi, 36, endpoint=False)
            ]
            assert np.mean(on_ring) > 0.9, f"circle of detection {number}"
            assert not yellow[round(y), round(x)], "the finding itself is not painted over"
    assert shown == set(range(1, len(result.detections) + 1))
    # Most confident first.
    assert source_index(images[0], sources) == round(result.detections[0].centre_ijk[2])


def test_classification_shows_the_middle_of_the_lungs(phantom: Series) -> None:
    sources, volume, ph = phantom
    result = phantom_results(volume, ph)["classification"]
    (ds,) = round_trip(build_key_images(sources, volume, result, software_version=SOFTWARE_VERSION))
    k = source_index(ds, sources)
    lung_slices = np.flatnonzero((ph.truth("Right Lung") | ph.truth("Left Lung")).any(axis=(1, 2)))
    assert lung_slices.min() < k < lung_slices.max()
    image = picture(ds, 128, 128, 3)
    np.testing.assert_array_equal(image[..., 0], window_slice(volume.voxels[k], LUNG_WINDOW))


def test_registration_side_by_side_and_checkerboard(phantom: Series) -> None:
    sources, volume, ph = phantom
    result = phantom_results(volume, ph)["registration"]
    assert result.registration is not None
    side, checker = round_trip(build_key_images(sources, volume, result, software_version=SOFTWARE_VERSION))
    k = source_index(side, sources)
    assert k == source_index(checker, sources) == len(sources) // 2
    assert (int(side.Columns), int(checker.Columns)) == (2 * 128 * 3, 128 * 3)
    current = window_slice(volume.voxels[k], SOFT_TISSUE_WINDOW)
    prior = window_slice(result.registration.resampled[k], SOFT_TISSUE_WINDOW)
    panels = np.asarray(side.pixel_array[: 128 * 3 : 3, ::3, 0])
    rows = slice(20, None)  # below the panel captions
    np.testing.assert_array_equal(panels[rows, :128], current[rows])
    np.testing.assert_array_equal(panels[rows, 129:], prior[rows, 1:])  # column 0 of the prior: the separator
    board = picture(checker, 128, 128, 3)[..., 0]
    assert ((board == current) | (board == prior)).all()
    assert (board != current).any() and (board != prior).any()


def test_nothing_to_show(phantom: Series) -> None:
    sources, volume, ph = phantom
    nothing = Segment("Body", SCT_ANATOMICAL_STRUCTURE, SCT_BODY, np.zeros(volume.voxels.shape, dtype=bool))
    empty = replace(phantom_results(volume, ph)["segmentation"], segments=(nothing,))
    with pytest.raises(EmptyResultError):
        build_key_images(sources, volume, empty, software_version=SOFTWARE_VERSION)
    with pytest.raises(EmptyResultError):
        build_key_images(sources, volume, ModelResult("m", "1"), software_version=SOFTWARE_VERSION)
    with pytest.raises(ValueError, match="sources"):
        build_key_images(sources[:-1], volume, phantom_results(volume, ph)["classification"],
                         software_version=SOFTWARE_VERSION)


def test_max_images(phantom: Series) -> None:
    sources, volume, ph = phantom
    result = phantom_results(volume, ph)["detection"]
    assert len(build_key_images(sources, volume, result, software_version=SOFTWARE_VERSION, max_images=1)) == 1


def test_mr_and_many_segments(phantom: Series) -> None:
    """Non-CT: percentile window; segment colours cycle through the SEG palette like the SEG's."""
    sources, volume, _ = phantom
    mr = replace(volume, modality="MR")
    segments = []
    for index in range(30):
        mask = np.zeros(volume.voxels.shape, dtype=bool)
        j, i = divmod(index, 6)
        mask[20, 10 + 20 * j : 25 + 20 * j, 5 + 20 * i : 20 + 20 * i] = True
        segments.append(Segment(f"S{index}", SCT_ANATOMICAL_STRUCTURE, SCT_BODY, mask))
    result = ModelResult("many", "1.0.0", segments=tuple(segments))
    (ds,) = round_trip(build_key_images(sources, mr, result, software_version=SOFTWARE_VERSION))
    assert source_index(ds, sources) == 20
    image = picture(ds, 128, 128, 3)
    for index, segment in enumerate(segments):
        assert (image[outline(segment.mask[20], 1)] == PALETTE_RGB[index % len(PALETTE_RGB)]).all()
    inside = ~np.any([s.mask[20] for s in segments], axis=0)
    np.testing.assert_array_equal(image[inside][:, 0], window_slice(volume.voxels[20], None)[inside])


def test_inconsistent_shapes(phantom: Series) -> None:
    sources, volume, _ = phantom
    reg = Registration(np.eye(4), 1.0, -0.5, np.zeros((1, 1, 1), dtype=np.float32), "2.25.1")
    with pytest.raises(ValueError, match="resampled"):
        build_key_images(sources, volume, ModelResult("m", "1", registration=reg), software_version=SOFTWARE_VERSION)
