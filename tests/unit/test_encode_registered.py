"""Registered prior series: round trip through bytes, JPEG-LS lossless, on the current geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from models.base import ModelResult, Registration
from testkit.dicom import write_ct_series
from testkit.phantom import make_ct_phantom
from tests.unit.encode_helpers import read_bytes, run_dciodvfy, write_bytes
from workers.encode.registered import build_registered_prior
from workers.load import load_series


@pytest.mark.parametrize("ts", [JPEGLSLossless, ExplicitVRLittleEndian])
def test_round_trip_on_the_current_geometry(tmp_path: Path, ts: str) -> None:
    kw = {"n_slices": 12, "rows": 64, "cols": 64, "pixel_mm": 4.0, "slice_mm": 3.0}
    current_files = write_ct_series(make_ct_phantom(seed=1, **kw), tmp_path / "c", uid_seed="c")  # type: ignore[arg-type]
    prior_files = write_ct_series(make_ct_phantom(seed=2, **kw), tmp_path / "p", uid_seed="p")  # type: ignore[arg-type]
    volume, current = load_series(current_files)
    _, prior = load_series(prior_files)
    rng = np.random.default_rng(0)
    resampled = rng.normal(0, 300, volume.voxels.shape).astype(np.float32)
    resampled[0, 0, 0] = 40000.0  # clipped to int16
    reg = Registration(np.eye(4), 1.25, -0.5, resampled, str(prior[0].FrameOfReferenceUID))
    result = ModelResult("ct-registration", "1.0.0", registration=reg)
    images = build_registered_prior(current, prior, result, software_version="test", transfer_syntax_uid=ts)
    assert len(images) == len(current)
    errors, _ = run_dciodvfy(write_bytes(images[0]), tmp_path, "registered.dcm")
    assert errors == []
    for k, (image, template) in enumerate(zip(images, current, strict=True)):
        back = read_bytes(write_bytes(image))
        assert back.file_meta.TransferSyntaxUID == ts
        assert back.ImagePositionPatient == template.ImagePositionPatient
        assert back.FrameOfReferenceUID == template.FrameOfReferenceUID
        assert back.SeriesDescription == "AI REGISTERED PRIOR ct-registration" and back.SeriesNumber == 902
        expected = np.clip(np.rint(resampled[k]), -32768, 32767).astype(np.int16)
        np.testing.assert_array_equal(back.pixel_array, expected)  # lossless
    assert len({str(i.SOPInstanceUID) for i in images}) == len(images)


def test_multi_frame_ct_current_gets_single_frame_images_on_its_frames(tmp_path: Path) -> None:
    """One Legacy Converted Enhanced CT image, frames stored head first: the registered prior is one
    CT image per slice, at the positions the single-frame slices had, with the image's patient/study."""
    import highdicom as hd
    import pydicom

    from workers.encode.header import PATIENT_STUDY_KEYWORDS

    kw = {"n_slices": 10, "rows": 48, "cols": 48, "pixel_mm": 5.0, "slice_mm": 3.0}
    single_files = write_ct_series(make_ct_phantom(seed=3, **kw), tmp_path / "c", uid_seed="mf",  # type: ignore[arg-type]
                                   reverse_slices=True)
    prior_files = write_ct_series(make_ct_phantom(seed=4, **kw), tmp_path / "p", uid_seed="mfp")  # type: ignore[arg-type]
    _, single = load_series(single_files)  # k order, for the expected geometry
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(f) for f in single_files], series_instance_uid=pydicom.uid.generate_uid(),
        series_number=2, sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1,
        include_dimension_index=False)
    mf_path = tmp_path / "mf.dcm"
    mf.save_as(mf_path, enforce_file_format=True)
    volume, current = load_series([mf_path])
    assert volume.source_frames is not None and len(current) == 1
    _, prior = load_series(prior_files)
    resampled = np.random.default_rng(1).normal(0, 300, volume.voxels.shape).astype(np.float32)
    reg = Registration(np.eye(4), 0.5, 0.0, resampled, str(prior[0].FrameOfReferenceUID))
    result = ModelResult("ct-registration", "1.0.0", registration=reg)
    with pytest.raises(ValueError, match="given with its volume"):
        build_registered_prior(current, prior, result, software_version="test")
    images = build_registered_prior(current, prior, result, software_version="test", volume=volume)
    assert len(images) == volume.voxels.shape[0]
    for k in (0, len(images) - 1):
        errors, _ = run_dciodvfy(write_bytes(images[k]), tmp_path, f"registered-{k}.dcm")
        assert errors == []
    for k, (image, template) in enumerate(zip(images, single, strict=True)):
        back = read_bytes(write_bytes(image))
        assert back.SOPClassUID == pydicom.uid.CTImageStorage and int(back.get("NumberOfFrames", 1)) == 1
        np.testing.assert_allclose([float(v) for v in back.ImagePositionPatient],
                                   [float(v) for v in template.ImagePositionPatient], atol=1e-4)
        np.testing.assert_allclose([float(v) for v in back.ImageOrientationPatient],
                                   [float(v) for v in template.ImageOrientationPatient], atol=1e-6)
        np.testing.assert_allclose([float(v) for v in back.PixelSpacing],
                                   [float(v) for v in template.PixelSpacing], atol=1e-6)
        assert back.FrameOfReferenceUID == mf.FrameOfReferenceUID
        assert back.StudyInstanceUID == mf.StudyInstanceUID
        assert all(back.get(key) == mf.get(key) for key in PATIENT_STUDY_KEYWORDS if key in mf)
        np.testing.assert_array_equal(back.pixel_array, np.clip(np.rint(resampled[k]), -32768, 32767))
