"""Series -> Volume with patient geometry.

Slices are sorted by their position along the slice normal (row x column direction cosines), never
by Instance Number or file name; spacing comes from the positions, not from Slice Thickness; the
modality rescale is applied. The source datasets come back in the same k order, for the encoders.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from models.base import UnsuitableInput, Volume

ORIENTATION_TOLERANCE = 1e-3
"""Maximum difference between direction cosines of slices in one volume."""
SPACING_TOLERANCE = 0.05
"""Maximum relative deviation of a slice gap from the median gap (irregular spacing above this)."""


def _geometry(ds: Dataset) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    try:
        iop = np.array([float(x) for x in ds.ImageOrientationPatient], dtype=np.float64)
        ipp = np.array([float(x) for x in ds.ImagePositionPatient], dtype=np.float64)
    except (AttributeError, TypeError, ValueError) as exc:
        raise UnsuitableInput("slices lack Image Orientation/Position (Patient)") from exc
    if iop.shape != (6,) or ipp.shape != (3,):
        raise UnsuitableInput("malformed Image Orientation/Position (Patient)")
    return iop, ipp


def sort_slices(datasets: Sequence[Dataset]) -> tuple[list[Dataset], npt.NDArray[np.float64]]:
    """Sort single-frame slices along the slice normal; returns them and the 4x4 affine."""
    if not datasets:
        raise UnsuitableInput("empty series")
    iop0, _ = _geometry(datasets[0])
    row, col = iop0[:3], iop0[3:]
    normal = np.cross(row, col)
    keyed = []
    for ds in datasets:
        iop, ipp = _geometry(ds)
        if np.max(np.abs(iop - iop0)) > ORIENTATION_TOLERANCE:
            raise UnsuitableInput("slices have different orientations")
        keyed.append((float(ipp @ normal), ipp, ds))
    keyed.sort(key=lambda t: t[0])
    positions = [k[0] for k in keyed]
    if len(set(np.round(positions, 4))) != len(positions):
        raise UnsuitableInput("several slices share one position (multiple stacks or duplicates)")
    first_ipp = keyed[0][1]
    try:
        dr, dc = (float(x) for x in datasets[0].PixelSpacing)  # row spacing, column spacing
    except (AttributeError, TypeError, ValueError) as exc:
        raise UnsuitableInput("Pixel Spacing missing") from exc
    if len(keyed) > 1:
        steps = np.array([keyed[i + 1][1] - keyed[i][1] for i in range(len(keyed) - 1)])
        gaps = np.linalg.norm(steps, axis=1)
        median = float(np.median(gaps))
        if np.any(np.abs(gaps - median) > SPACING_TOLERANCE * median):
            raise UnsuitableInput("irregular slice spacing")
        slice_vec = steps.mean(axis=0)
    else:
        thickness = float(datasets[0].get("SliceThickness") or 1.0)
        slice_vec = normal * thickness
    affine = np.eye(4)
    affine[:3, 0] = row * dc
    affine[:3, 1] = col * dr
    affine[:3, 2] = slice_vec
    affine[:3, 3] = first_ipp
    return [k[2] for k in keyed], affine


def _rescaled(ds: Dataset) -> npt.NDArray[np.float32]:
    arr = ds.pixel_array.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1.0:
        arr *= slope
    if intercept != 0.0:
        arr += intercept
    return arr


def load_series(paths: Sequence[Path]) -> tuple[Volume, list[Dataset]]:
    """Read single-frame image files of one series into a Volume and its k-ordered datasets."""
    datasets = [pydicom.dcmread(p) for p in paths]
    return volume_from_datasets(datasets)


def volume_from_datasets(datasets: Sequence[Dataset]) -> tuple[Volume, list[Dataset]]:
    if any(int(ds.get("NumberOfFrames") or 1) > 1 for ds in datasets):
        raise UnsuitableInput("multi-frame images are not supported by this loader yet")
    modalities = {str(ds.get("Modality", "")) for ds in datasets}
    if len(modalities) != 1:
        raise UnsuitableInput("mixed modalities in one series")
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) != 1:
        raise UnsuitableInput("slices of different sizes")
    ordered, affine = sort_slices(datasets)
    voxels = np.stack([_rescaled(ds) for ds in ordered]).astype(np.float32, copy=False)
    volume = Volume(
        voxels=voxels,
        affine=affine,
        modality=modalities.pop(),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in ordered),
        frame_of_reference_uid=str(ordered[0].get("FrameOfReferenceUID", "")),
    )
    return volume, ordered
