"""Registered prior series: round trip through bytes, JPEG-LS lossless, on the current geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from models.base import ModelResult, Registration
from models.phantom import make_ct_phantom
from tests.unit.encode_helpers import read_bytes, run_dciodvfy, write_bytes
from workers.encode.registered import build_registered_prior
from workers.load import load_series
from workers.synthetic import write_ct_series


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
