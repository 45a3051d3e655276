"""workers.load: series -> Volume on patient geometry, whatever the file order and orientation."""

from pathlib import Path

import numpy as np
import pydicom
import pytest

from models import registry
from models.base import UnsuitableInput
from testkit.dicom import phantom_truth_in_volume_order, write_ct_series, written_affine
from testkit.phantom import make_ct_phantom
from workers.load import load_series

PHANTOM = make_ct_phantom(n_slices=12, rows=64, cols=64, pixel_mm=6.0, slice_mm=2.5, seed=4)


@pytest.mark.parametrize(("flip_rows", "flip_cols", "reverse"), [(False, False, False), (True, False, True),
                                                                 (False, True, False), (True, True, True)])
def test_geometry_follows_the_patient_not_the_files(tmp_path: Path, flip_rows: bool, flip_cols: bool,
                                                    reverse: bool) -> None:
    files = write_ct_series(PHANTOM, tmp_path, flip_rows=flip_rows, flip_cols=flip_cols, reverse_slices=reverse)
    volume, sources = load_series(list(reversed(files)) if reverse else files)
    np.testing.assert_allclose(volume.affine, written_affine(PHANTOM, flip_rows=flip_rows, flip_cols=flip_cols),
                               atol=1e-6)
    assert volume.spacing == pytest.approx((2.5, 6.0, 6.0))
    lung = phantom_truth_in_volume_order(PHANTOM, "Left Lung", flip_rows=flip_rows, flip_cols=flip_cols)
    assert volume.voxels[lung].mean() < -700  # HU after rescale, at the truth's voxels
    # the patient's left lung is at +x in LPS, whatever the array order
    centre = volume.to_patient(np.argwhere(lung)[:, ::-1].mean(axis=0))
    assert centre[0] > 0
    assert [str(d.SOPInstanceUID) for d in sources] == list(volume.sop_instance_uids)
    iop = np.array(sources[0].ImageOrientationPatient, dtype=float)
    along = [float(np.cross(iop[:3], iop[3:]) @ np.array(d.ImagePositionPatient, dtype=float)) for d in sources]
    assert along == sorted(along)  # k increases along the slice normal (row x column)


def test_irregular_spacing_and_mixed_orientation_are_unsuitable(tmp_path: Path) -> None:
    files = write_ct_series(PHANTOM, tmp_path)
    with pytest.raises(UnsuitableInput, match="irregular"):
        load_series(files[:5] + files[6:])  # a missing slice
    ds = pydicom.dcmread(files[3])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(files[3])
    with pytest.raises(UnsuitableInput, match="orientation"):
        load_series(files)


def test_gantry_tilt_is_skipped_with_a_reason(tmp_path: Path) -> None:
    files = write_ct_series(PHANTOM, tmp_path)
    for k, f in enumerate(files):  # positions sheared along y: a 15 degree gantry tilt
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + np.tan(np.deg2rad(15)) * 2.5 * k, z]
        ds.save_as(f)
    volume, _ = load_series(files)
    for name in ("ct-hu-segmentation", "ct-lung-nodules"):
        with pytest.raises(UnsuitableInput, match="tilt"):
            registry.load(name).check(volume)
