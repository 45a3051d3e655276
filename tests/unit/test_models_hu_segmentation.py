"""The classical ct-hu-segmentation model on phantoms (with truth) and on the real CT series."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from models.base import ModelResult, UnsuitableInput, Volume
from models.ct_hu_segmentation import CtHuSegmentation
from testkit.dicom import phantom_truth_in_volume_order, write_ct_series
from testkit.phantom import Phantom, make_ct_phantom

NAMES = ("Body", "Right Lung", "Left Lung", "Bone", "Airway")
DICE_MIN = {"Body": 0.9, "Right Lung": 0.9, "Left Lung": 0.9, "Bone": 0.8}


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def masks(result: ModelResult) -> dict[str, npt.NDArray[np.bool_]]:
    return {s.name: s.mask for s in result.segments}


def centroid_lps(mask: npt.NDArray[np.bool_], affine: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    kji = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ kji[::-1] + affine[:3, 3]


def flipped(volume: Volume, axes: tuple[int, ...]) -> Volume:
    """The same patient with the array reversed along ``axes`` (0=k, 1=j, 2=i) and the affine fixed."""
    voxels = volume.voxels
    affine = volume.affine.copy()
    for axis in axes:
        voxels = np.flip(voxels, axis=axis)
        col = 2 - axis  # affine column of this array axis
        affine[:3, 3] += (volume.voxels.shape[axis] - 1) * affine[:3, col]
        affine[:3, col] *= -1
    uids = volume.sop_instance_uids[::-1] if 0 in axes else volume.sop_instance_uids
    return Volume(np.ascontiguousarray(voxels), affine, volume.modality, uids, volume.frame_of_reference_uid)


@pytest.fixture(scope="module")
def model() -> CtHuSegmentation:
    return CtHuSegmentation()


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_ct_phantom(40, 128, 128, pixel_mm=2.4, slice_mm=5.0, seed=11)


@pytest.fixture(scope="module")
def result(model: CtHuSegmentation, phantom: Phantom) -> ModelResult:
    return model.run(phantom.to_volume())


def test_result_shape_and_codes(model: CtHuSegmentation, phantom: Phantom, result: ModelResult) -> None:
    assert (result.model_name, result.model_version) == ("ct-hu-segmentation", "1.2.0")
    assert tuple(s.name for s in result.segments) == NAMES
    declared = {o.name: o for o in model.manifest.outputs}
    for seg in result.segments:
        assert seg.mask.dtype == np.bool_ and seg.mask.shape == phantom.shape
        assert seg.category == declared[seg.name].category and seg.type == declared[seg.name].type
    lat = {s.name: s.laterality for s in result.segments}
    assert lat["Right Lung"] is not None and lat["Right Lung"].value == "24028007"
    assert lat["Left Lung"] is not None and lat["Left Lung"].value == "7771000"
    assert lat["Body"] is None


def test_dice_on_phantom(phantom: Phantom, result: ModelResult) -> None:
    got = masks(result)
    scores = {name: dice(got[name], phantom.truth(name)) for name in DICE_MIN}
    print("Dice:", {k: round(v, 4) for k, v in scores.items()})
    for name in DICE_MIN:
        assert scores[name] >= DICE_MIN[name], (name, scores[name])


def test_airway_is_tracked_and_taken_out_of_the_lungs(phantom: Phantom, result: ModelResult) -> None:
    got = masks(result)
    airway, truth = got["Airway"], phantom.truth("Airway")
    precision = (airway & truth).sum() / max(1, airway.sum())
    recall = (airway & truth).sum() / truth.sum()
    print(f"airway precision {precision:.3f} recall {recall:.3f}")
    assert precision >= 0.95 and recall >= 0.3  # trachea and carina; bronchi only in part
    assert not (airway & (got["Right Lung"] | got["Left Lung"])).any()
    top = int(np.flatnonzero(truth.any(axis=(1, 2))).max())  # the most superior airway slice (+z up)
    assert airway[top].any(), "the trachea at the top of the lungs is found"


def test_table_and_gas_excluded(phantom: Phantom, result: ModelResult) -> None:
    got = masks(result)
    table = phantom.truth("Table")
    gas = phantom.truth("Gas")
    assert table.sum() > 100 and gas.sum() > 100  # the phantom really has them
    assert (got["Body"] & table).sum() <= 0.01 * table.sum()
    lungs = got["Right Lung"] | got["Left Lung"]
    assert (lungs & gas).sum() <= 0.01 * gas.sum()
    assert any("gas" in note for note in result.notes)
    for name in NAMES[1:]:
        assert not (got[name] & ~got["Body"]).any(), name


@pytest.mark.parametrize("pixel_mm", [2.4, 0.8])
def test_table_touching_the_body_is_mostly_cut_off(model: CtHuSegmentation, pixel_mm: float) -> None:
    """The table touches the back at the midline; the opening must cut its wings off (a plain
    threshold + largest component would include all of it)."""
    n = round(307.2 / pixel_mm)
    p = make_ct_phantom(8, n, n, pixel_mm=pixel_mm, slice_mm=5.0, table_gap_mm=0.0, nodules=0)
    body = masks(model.run(p.to_volume()))["Body"]
    table = p.truth("Table")
    assert (body & table).sum() <= 0.5 * table.sum()
    assert dice(body, p.truth("Body")) >= 0.97


@pytest.mark.parametrize("axes", [(2,), (1, 2), (0, 2), (0, 1, 2)])
def test_left_right_follow_patient_coordinates(
    model: CtHuSegmentation, phantom: Phantom, axes: tuple[int, ...]
) -> None:
    """Mirrored arrays (negative affine columns): 'Left Lung' is still the +x (patient left) lung."""
    vol = flipped(phantom.to_volume(), axes)
    assert np.linalg.det(vol.affine[:3, :3]) * np.linalg.det(phantom.affine[:3, :3]) != 0
    got = masks(model.run(vol))
    for name in ("Right Lung", "Left Lung"):
        truth = np.flip(phantom.truth(name), axis=axes)
        assert dice(got[name], truth) >= DICE_MIN[name], (axes, name)
    assert centroid_lps(got["Right Lung"], vol.affine)[0] < -20
    assert centroid_lps(got["Left Lung"], vol.affine)[0] > 20


@pytest.mark.parametrize(("flip_rows", "flip_cols"), [(False, True), (True, True)])
def test_written_and_reloaded_series(
    tmp_path: Path, load_ct: Callable[[Path], Volume], model: CtHuSegmentation, flip_rows: bool, flip_cols: bool
) -> None:
    """Phantom -> DICOM files (mirrored encodings) -> loader -> model: sides and Dice hold."""
    p = make_ct_phantom(24, 96, 96, pixel_mm=3.2, slice_mm=6.0, seed=5)
    write_ct_series(p, tmp_path, flip_rows=flip_rows, flip_cols=flip_cols, reverse_slices=True)
    vol = load_ct(tmp_path)
    got = masks(model.run(vol))
    for name in DICE_MIN:
        truth = phantom_truth_in_volume_order(p, name, flip_rows=flip_rows, flip_cols=flip_cols)
        assert dice(got[name], truth) >= DICE_MIN[name], name
    assert centroid_lps(got["Left Lung"], vol.affine)[0] > 20


def test_off_centre_patient_without_airways(model: CtHuSegmentation) -> None:
    p = make_ct_phantom(30, 128, 128, pixel_mm=2.4, slice_mm=5.0, seed=2, shift_mm=(30.0, -15.0, 0.0), airways=False)
    got = masks(model.run(p.to_volume()))
    for name in DICE_MIN:
        assert dice(got[name], p.truth(name)) >= DICE_MIN[name], name
    assert not got["Airway"].any()  # no airways in this phantom: nothing tracked


def test_unsuitable_inputs(model: CtHuSegmentation, phantom: Phantom) -> None:
    vol = phantom.to_volume()
    with pytest.raises(UnsuitableInput, match="modality"):
        model.check(dataclasses.replace(vol, modality="MR"))
    with pytest.raises(UnsuitableInput, match="modality"):
        model.run(dataclasses.replace(vol, modality="MR"))
    two = Volume(vol.voxels[:2].copy(), vol.affine, "CT", vol.sop_instance_uids[:2], vol.frame_of_reference_uid)
    with pytest.raises(UnsuitableInput, match="slices"):
        model.check(two)
    model.check(vol)  # a proper CT passes


def test_empty_segments_are_returned_and_noted(model: CtHuSegmentation, phantom: Phantom) -> None:
    # A body of soft tissue only: no lungs, no bone.
    hu = np.where(phantom.truth("Body"), 40.0, -1000.0).astype(np.float32)
    vol = dataclasses.replace(phantom.to_volume(), voxels=hu)
    res = model.run(vol)
    got = masks(res)
    assert tuple(got) == NAMES
    assert dice(got["Body"], phantom.truth("Body")) > 0.95
    for name in ("Right Lung", "Left Lung", "Bone"):
        assert not got[name].any()
        assert f"{name}: empty" in res.notes


def test_real_ct_plausible(model: CtHuSegmentation, ct_real_20: Volume) -> None:
    """tests/data/ct-real-20: upper abdomen (liver, stomach with gas, spleen, spine, ribs, both
    arms beside the trunk, the CT table below), only a sub-millilitre sliver of right lung base."""
    vol = ct_real_20
    assert vol.voxels.shape == (20, 512, 512)
    res = model.run(vol)
    got = masks(res)
    ml = {name: float(m.sum()) * vol.voxel_volume_ml for name, m in got.items()}
    print("real CT volumes (ml):", {k: round(v, 1) for k, v in ml.items()}, res.notes)
    body = got["Body"]
    # 20 slices x 2 mm of an adult trunk plus arms: 700-900 cm2 per slice.
    area_cm2 = body.sum(axis=(1, 2)) * vol.spacing[1] * vol.spacing[2] / 100.0
    assert np.all((area_cm2 > 500) & (area_cm2 < 1200)), area_cm2
    assert 2000 < ml["Body"] < 4500
    for name in NAMES[1:]:
        assert not (got[name] & ~body).any(), f"{name} outside the body"
    # No lungs in this field of view; the stomach/colon gas (about 15 ml each) is not lung.
    assert ml["Right Lung"] < 5 and ml["Left Lung"] < 5
    # Bone (spine, ribs, arm bones) on every slice, centred near the midline, behind the body centre.
    assert 80 < ml["Bone"] < 400
    assert np.all(got["Bone"].sum(axis=(1, 2)) * vol.voxel_volume_ml > 3.0)
    bone_c, body_c = centroid_lps(got["Bone"], vol.affine), centroid_lps(body, vol.affine)
    assert abs(bone_c[0] - body_c[0]) < 30 and bone_c[1] > body_c[1]
    # The table (thin bright arcs from row ~415 down) is outside the body.
    rows = np.arange(vol.voxels.shape[1])
    assert (vol.voxels[:, rows >= 425, :] > -500).sum() > 1000  # the table is in the image
    assert not body[:, rows >= 425, :].any()
    # Outside air stays outside.
    assert not body[:, :5, :].any() and not body[:, :, :2].any()
