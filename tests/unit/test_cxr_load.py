"""workers.load on CR/DX images: one-slice volume, dense = bright whatever the photometric
interpretation and VOI LUT, pixel size at the patient, geometry from Patient Orientation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.errors import UnreadableInput, UnsuitableInput
from testkit.cxr_phantom import CxrPhantom, make_cxr_phantom, write_cxr
from workers.load import load_series


@pytest.fixture(scope="module")
def phantom() -> CxrPhantom:
    return make_cxr_phantom(size=400, pixel_mm=0.9, seed=3)


def test_monochrome1_and_voi_lut_read_as_dense_bright(phantom: CxrPhantom, tmp_path: Path) -> None:
    plain, _ = load_series([write_cxr(phantom, tmp_path / "m2.dcm")])
    inverted, _ = load_series([write_cxr(phantom, tmp_path / "m1.dcm", photometric="MONOCHROME1", voi_lut=True)])
    cr, _ = load_series([write_cxr(phantom, tmp_path / "cr.dcm", modality="CR", photometric="MONOCHROME1")])
    assert plain.voxels.shape == (1, 400, 400) and plain.modality == "DX" and cr.modality == "CR"
    np.testing.assert_array_equal(plain.voxels, inverted.voxels)
    np.testing.assert_array_equal(plain.voxels, cr.voxels)
    lungs = phantom.right_lung | phantom.left_lung
    assert plain.voxels[0][lungs].mean() < plain.voxels[0][~lungs].mean()  # air dark, tissue bright


def test_pixel_size_and_orientation(phantom: CxrPhantom, tmp_path: Path) -> None:
    magnified, _ = load_series([write_cxr(phantom, tmp_path / "a.dcm", magnification=1.2)])
    assert magnified.spacing[1:] == pytest.approx((0.9, 0.9))  # imager 1.08 mm / 1.2
    detector, _ = load_series([write_cxr(phantom, tmp_path / "b.dcm", magnification=None)])
    assert detector.spacing[1:] == pytest.approx((0.9, 0.9))
    path = write_cxr(phantom, tmp_path / "c.dcm", magnification=1.1)
    ds = pydicom.dcmread(path)
    ds.PixelSpacing = ["0.8", "0.8"]  # calibrated at the patient: preferred
    ds.PatientOrientation = ["R", "F"]
    ds.save_as(path)
    calibrated, sources = load_series([path])
    assert calibrated.spacing[1:] == pytest.approx((0.8, 0.8))
    assert calibrated.affine[0, 0] == pytest.approx(-0.8)  # columns towards the patient's right
    assert calibrated.affine[2, 1] == pytest.approx(-0.8)  # rows towards the feet
    assert calibrated.frame_of_reference_uid == "" and len(sources) == 1
    np.testing.assert_allclose(magnified.affine[:3, 2], [0.0, 1.0, 0.0])  # L x F = +y, 1 mm


def test_bad_radiographs_are_refused(phantom: CxrPhantom, tmp_path: Path) -> None:
    path = write_cxr(phantom, tmp_path / "d.dcm")
    ds = pydicom.dcmread(path)
    del ds.ImagerPixelSpacing
    ds.save_as(path)
    with pytest.raises(UnreadableInput, match="Imager Pixel Spacing"):
        load_series([path])
    two = [write_cxr(phantom, tmp_path / f"e{i}.dcm", uid_seed=f"two-{i}") for i in range(2)]
    with pytest.raises(UnsuitableInput, match="one projection per series"):
        load_series(two)
