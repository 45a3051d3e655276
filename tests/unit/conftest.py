"""Shared fixtures for the unit tests: a minimal CT series loader (models.base conventions)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.base import Volume

CT_REAL_20_DIR = Path(__file__).resolve().parents[1] / "data" / "ct-real-20"

LoadCt = Callable[[Path | Sequence[Path]], Volume]


def load_ct_series(source: Path | Sequence[Path]) -> Volume:
    """Read single-frame slices, sort them along the slice normal, apply rescale, build the affine.

    A test helper, not the node's loader: one series, parallel equally spaced slices assumed.
    """
    paths = sorted(p for p in Path(source).iterdir() if p.is_file()) if isinstance(source, Path) else list(source)
    datasets = [pydicom.dcmread(p) for p in paths]
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    datasets.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64), normal)))
    first = np.asarray(datasets[0].ImagePositionPatient, dtype=np.float64)
    last = np.asarray(datasets[-1].ImagePositionPatient, dtype=np.float64)
    spacing_rows, spacing_cols = (float(v) for v in datasets[0].PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = row_cos * spacing_cols  # i: next column, along the row direction
    affine[:3, 1] = col_cos * spacing_rows  # j: next row, along the column direction
    if len(datasets) > 1:
        affine[:3, 2] = (last - first) / (len(datasets) - 1)
    else:
        affine[:3, 2] = normal * float(datasets[0].get("SliceThickness", 1.0) or 1.0)
    affine[:3, 3] = first
    voxels = np.stack(
        [
            ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1.0))
            + float(ds.get("RescaleIntercept", 0.0))
            for ds in datasets
        ]
    ).astype(np.float32)
    return Volume(
        voxels=voxels,
        affine=affine,
        modality=str(datasets[0].Modality),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in datasets),
        frame_of_reference_uid=str(datasets[0].FrameOfReferenceUID),
    )


@pytest.fixture(scope="session")
def load_ct() -> LoadCt:
    """The :func:`load_ct_series` helper."""
    return load_ct_series


@pytest.fixture(scope="session")
def ct_real_20() -> Volume:
    """The real 20-slice CT (tests/data/ct-real-20) as a Volume; do not modify its arrays."""
    volume = load_ct_series(CT_REAL_20_DIR)
    volume.voxels.setflags(write=False)
    return volume
