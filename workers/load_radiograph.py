"""A projection radiograph (CR, DX) -> a one-slice Volume, dense = bright.

Choices (what the models see):

* Values: the stored values with the modality rescale (Rescale Slope/Intercept) applied, and for
  MONOCHROME1 (minimum = white) mirrored within the stored range, so that a denser structure is
  always brighter. The VOI LUT (Window Center/Width or a VOI LUT Sequence, often non-linear) and
  the Presentation LUT are display choices and are NOT applied: models normalise by percentiles.
* Geometry: Image Orientation/Position (Patient) when the image has them (rare for CR/DX).
  Otherwise a synthetic affine: the row and column directions from Patient Orientation (0020,0020)
  (e.g. ``L\\F``: columns run towards the patient's left, rows towards the feet; default ``L\\F``,
  the PA chest convention), origin (0, 0, 0), a 1 mm step along the normal. Pixel size at the
  patient: Pixel Spacing when present (already calibrated), else Imager Pixel Spacing divided by
  Estimated Radiographic Magnification Factor when present, else Imager Pixel Spacing (the size at
  the detector, which overstates the patient's by the magnification, typically 5-15 %).
* What a SEG then references: the source image itself (Derivation Image / Source Image per frame,
  pixel for pixel); without a Frame of Reference UID on the source, the SEG has none either and no
  plane positions (highdicom writes it that way), so viewers overlay it on that image only
  (:func:`workers.encode.seg.build_seg` adds the Pixel Measures and nominal orientation OHIF needs).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from models.base import Volume
from models.errors import UnreadableInput, UnsuitableInput

PROJECTION_MODALITIES = frozenset({"CR", "DX"})
"""Modalities read as one projection image (not a slice of a volume)."""

_DIRECTIONS: dict[str, tuple[float, float, float]] = {
    "L": (1.0, 0.0, 0.0), "R": (-1.0, 0.0, 0.0), "P": (0.0, 1.0, 0.0), "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0), "F": (0.0, 0.0, -1.0),
}


def is_projection(datasets: list[Dataset]) -> bool:
    """True for one CR/DX image (read with :func:`volume_from_radiograph`)."""
    return len(datasets) == 1 and str(datasets[0].get("Modality", "")).upper() in PROJECTION_MODALITIES


def _pair(ds: Dataset, keyword: str) -> tuple[float, float] | None:
    if keyword not in ds or ds[keyword].value in (None, ""):
        return None
    try:
        a, b = (float(v) for v in ds[keyword].value)
    except (TypeError, ValueError) as exc:
        raise UnreadableInput(f"malformed {keyword}") from exc
    if not (a > 0 and b > 0 and np.isfinite(a) and np.isfinite(b)):
        raise UnreadableInput(f"malformed {keyword}")
    return a, b


def projection_spacing(ds: Dataset) -> tuple[float, float]:
    """(between rows, between columns) in mm at the patient (see the module docstring)."""
    spacing = _pair(ds, "PixelSpacing")
    if spacing is not None:
        return spacing
    imager = _pair(ds, "ImagerPixelSpacing")
    if imager is None:
        raise UnreadableInput("neither Pixel Spacing nor Imager Pixel Spacing: the pixel size is unknown")
    try:
        magnification = float(ds.get("EstimatedRadiographicMagnificationFactor") or 1.0)
    except (TypeError, ValueError):
        magnification = 1.0
    if not (np.isfinite(magnification) and 0.5 <= magnification <= 3.0):
        magnification = 1.0
    return imager[0] / magnification, imager[1] / magnification


def _directions(ds: Dataset) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Row and column direction cosines: from Image Orientation (Patient), else Patient Orientation."""
    if "ImageOrientationPatient" in ds and "ImagePositionPatient" in ds:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        return iop[:3], iop[3:]
    letters = [str(v).strip().upper()[:1] for v in (ds.get("PatientOrientation") or [])]
    if len(letters) == 2 and all(c in _DIRECTIONS for c in letters):
        row, col = (np.array(_DIRECTIONS[c]) for c in letters)
        if abs(float(row @ col)) < 1e-6:
            return row, col
    return np.array(_DIRECTIONS["L"]), np.array(_DIRECTIONS["F"])


def dense_is_bright(ds: Dataset, pixels: npt.NDArray[np.float32], slope: float, intercept: float
                    ) -> npt.NDArray[np.float32]:
    """``pixels`` (rescaled) mirrored within the rescaled stored range when the image is MONOCHROME1."""
    if str(ds.get("PhotometricInterpretation", "")).strip() != "MONOCHROME1":
        return pixels
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    a, b = lo * slope + intercept, hi * slope + intercept
    return ((a + b) - pixels).astype(np.float32)


def volume_from_radiograph(ds: Dataset, pixels: npt.NDArray[np.float32], slope: float, intercept: float) -> Volume:
    """The one-slice Volume of a CR/DX image; ``pixels`` are its decoded values with the rescale applied."""
    if int(ds.get("NumberOfFrames") or 1) != 1 or pixels.ndim != 2:
        raise UnsuitableInput("a projection radiograph with several frames is not supported")
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise UnsuitableInput("colour images are not supported")
    dr, dc = projection_spacing(ds)
    row, col = _directions(ds)
    affine = np.eye(4)
    affine[:3, 0] = row * dc
    affine[:3, 1] = col * dr
    affine[:3, 2] = np.cross(row, col)
    if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
        affine[:3, 3] = [float(v) for v in ds.ImagePositionPatient]
    voxels = dense_is_bright(ds, pixels, slope, intercept)[np.newaxis].astype(np.float32, copy=False)
    return Volume(
        voxels=voxels,
        affine=affine,
        modality=str(ds.Modality).upper(),
        sop_instance_uids=(str(ds.SOPInstanceUID),),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
    )
