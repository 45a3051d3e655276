"""Write a :class:`testkit.phantom.Phantom` as a valid DICOM CT Image Storage series.

Each slice becomes one complete CT Image Storage instance (all Type 1 and Type 2 attributes of
the CT Image IOD's mandatory modules, plus a VOI LUT window). Pixels are stored as 12-bit
unsigned values with RescaleIntercept -1024 / RescaleSlope 1, so they read back as the phantom's
HU exactly.

Orientation options change only the encoding, never the anatomy: with ``flip_cols`` the row
direction cosine is (-1, 0, 0) and each row is written mirrored; with ``flip_rows`` the column
direction cosine is (0, -1, 0) and the rows are written bottom-up; Image Position (Patient) is
always the true position of the first transmitted pixel. ``reverse_slices`` numbers instances
(and orders the returned file list) from head to feet; positions stay true.

Mapping truth to the files: a loader that sorts the slices by position along the slice normal
(row x column cosines) sees ``written_volume_order(phantom.hu, ...)`` with affine
``written_affine(...)``; :func:`phantom_truth_in_volume_order` gives truth masks in that order.

UIDs are deterministic ``2.25.`` UIDs derived from ``uid_seed`` (default: the phantom's seed),
so repeated calls give the same UIDs; the series and instance UIDs also depend on the encoding
options, the study and frame of reference UIDs do not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from testkit.phantom import HU_MAX, HU_MIN, Phantom, phantom_uid

RESCALE_INTERCEPT = -1024
STUDY_DATE, STUDY_TIME = "20240101", "120000"
# Transfer syntaxes that keep the HU exactly (compressed ones need their pydicom encoder plugin).
SUPPORTED_TRANSFER_SYNTAXES = frozenset(
    {
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        RLELossless,
        JPEGLSLossless,
        JPEG2000Lossless,
    }
)


def _flips(flip_rows: bool, flip_cols: bool) -> tuple[float, float, bool]:
    """Row-cosine x sign, column-cosine y sign, and whether the slice normal points to -z."""
    sr = -1.0 if flip_cols else 1.0
    sc = -1.0 if flip_rows else 1.0
    return sr, sc, sr * sc < 0


def written_volume_order(
    array: npt.NDArray[np.generic], *, flip_rows: bool = False, flip_cols: bool = False
) -> npt.NDArray[np.generic]:
    """``array`` (phantom order k, j, i) as a loader sorting by the slice normal would see it."""
    _, _, k_reversed = _flips(flip_rows, flip_cols)
    out = array
    if flip_cols:
        out = out[:, :, ::-1]
    if flip_rows:
        out = out[:, ::-1, :]
    if k_reversed:
        out = out[::-1]
    return out


def phantom_truth_in_volume_order(
    phantom: Phantom, name: str, *, flip_rows: bool = False, flip_cols: bool = False
) -> npt.NDArray[np.bool_]:
    """Truth mask ``name`` of ``phantom`` in the voxel order of the written, re-loaded series."""
    return np.ascontiguousarray(written_volume_order(phantom.truth(name), flip_rows=flip_rows, flip_cols=flip_cols))


def written_affine(phantom: Phantom, *, flip_rows: bool = False, flip_cols: bool = False) -> npt.NDArray[np.float64]:
    """The (i, j, k, 1) -> LPS affine of the written series in slice-normal order (models.base)."""
    sr, sc, k_reversed = _flips(flip_rows, flip_cols)
    n, rows, cols = phantom.shape
    i0 = cols - 1 if flip_cols else 0
    j0 = rows - 1 if flip_rows else 0
    k0 = n - 1 if k_reversed else 0
    a = np.eye(4)
    a[:3, 0] = (sr * phantom.pixel_mm, 0.0, 0.0)
    a[:3, 1] = (0.0, sc * phantom.pixel_mm, 0.0)
    a[:3, 2] = (0.0, 0.0, (-1.0 if k_reversed else 1.0) * phantom.slice_mm)
    a[:3, 3] = phantom.affine[:3, :3] @ np.array([i0, j0, k0], dtype=np.float64) + phantom.affine[:3, 3]
    return a


def _ds_decimal(value: float) -> str:
    """A DS string (at most 16 characters) for ``value``."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    if len(text) > 16:
        text = f"{value:.8g}"
    return text


def write_ct_series(
    phantom: Phantom,
    out_dir: str | Path,
    *,
    patient_id: str = "PHANTOM-001",
    patient_name: str = "Phantom^Test",
    study_uid: str | None = None,
    series_uid: str | None = None,
    flip_rows: bool = False,
    flip_cols: bool = False,
    reverse_slices: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    uid_seed: int | str | None = None,
    series_number: int = 1,
    series_description: str = "Synthetic chest phantom",
) -> list[Path]:
    """Write one file per slice into ``out_dir``; return the paths in instance-number order."""
    ts = UID(transfer_syntax)
    if ts not in SUPPORTED_TRANSFER_SYNTAXES:
        raise ValueError(f"unsupported transfer syntax {ts} ({ts.name}); use one of the lossless ones")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = str(phantom.seed if uid_seed is None else uid_seed)
    variant = f"rows={flip_rows},cols={flip_cols},rev={reverse_slices},ts={ts},n={series_number}"
    study_uid = study_uid or phantom_uid(seed, "study", patient_id)
    series_uid = series_uid or phantom_uid(seed, "series", patient_id, variant)
    for_uid = phantom_uid(seed, "frame-of-reference", patient_id)

    sr, sc, _ = _flips(flip_rows, flip_cols)
    n, rows, cols = phantom.shape
    if phantom.hu.min() < HU_MIN or phantom.hu.max() > HU_MAX:
        raise ValueError(f"HU outside [{HU_MIN}, {HU_MAX}] cannot be stored in 12 bits")
    stored = (phantom.hu.astype(np.int32) - RESCALE_INTERCEPT).astype(np.uint16)
    i0 = cols - 1 if flip_cols else 0
    j0 = rows - 1 if flip_rows else 0
    iop = [sr, 0.0, 0.0, 0.0, sc, 0.0]

    paths: list[Path] = []
    for k in range(n):
        instance = n - k if reverse_slices else k + 1
        ipp = phantom.affine[:3, :3] @ np.array([i0, j0, k], dtype=np.float64) + phantom.affine[:3, 3]
        pixels = stored[k]
        if flip_cols:
            pixels = pixels[:, ::-1]
        if flip_rows:
            pixels = pixels[::-1, :]
        sop_uid = phantom_uid(seed, "sop", patient_id, variant, str(k))
        ds = _base_dataset(patient_id, patient_name, study_uid, series_uid, for_uid, series_number, series_description)
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = [_ds_decimal(float(v)) for v in ipp]
        ds.ImageOrientationPatient = [_ds_decimal(v) for v in iop]
        ds.SliceLocation = _ds_decimal(float(ipp[2]))
        ds.PixelSpacing = [_ds_decimal(phantom.pixel_mm), _ds_decimal(phantom.pixel_mm)]
        ds.SliceThickness = _ds_decimal(phantom.slice_mm)
        ds.Rows, ds.Columns = rows, cols
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if ts.is_compressed else ts
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        if ts.is_compressed:
            ds.compress(ts)
        path = out / f"CT{instance:05d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return sorted(paths)


def _base_dataset(
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    for_uid: str,
    series_number: int,
    series_description: str,
) -> Dataset:
    """Every per-series attribute of the CT Image IOD (per-slice ones are set by the caller)."""
    ds = Dataset()
    if not (patient_name + patient_id + series_description).isascii():
        ds.SpecificCharacterSet = "ISO_IR 192"
    # SOP Common
    ds.SOPClassUID = CTImageStorage
    ds.InstanceCreationDate, ds.InstanceCreationTime = STUDY_DATE, STUDY_TIME
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate, ds.StudyTime = STUDY_DATE, STUDY_TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "Synthetic CT"
    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = STUDY_DATE, STUDY_TIME
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    # Frame of Reference
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = "dicom-ai-node"
    ds.ManufacturerModelName = "synthetic phantom"
    # General Image / General Acquisition
    ds.ContentDate, ds.ContentTime = STUDY_DATE, STUDY_TIME
    ds.AcquisitionDate, ds.AcquisitionTime = STUDY_DATE, STUDY_TIME
    ds.AcquisitionNumber = 1
    # Image Pixel + CT Image
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.KVP = "120"
    # VOI LUT
    ds.WindowCenter = ["40", "-600"]
    ds.WindowWidth = ["400", "1500"]
    ds.WindowCenterWidthExplanation = ["SOFT TISSUE", "LUNG"]
    return ds
