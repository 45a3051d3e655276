"""DICOM Spatial Registration object (SRO, SOP class 1.2.840.10008.5.1.4.1.1.66.1, PS3.3 A.39.1).

Holds the transform of a registration result so that a viewer can link, fuse or sync the PRIOR
study with the CURRENT one. The object belongs to the current study and its Frame of Reference is
the current series' one: that is the *Registered RCS*; the prior series' frame is a *Source RCS*.

Direction convention (checked against the standard):

* PS3.3 C.20.2, Matrix Sequence (0070,030A): "Specifies one transformation, that registers the
  Source RCS/images to the Registered RCS."
* PS3.3 C.20.2.1.1: "The Frame of Reference Transformation Matrix (3006,00C6) AMB describes how to
  transform a point (Bx,By,Bz) with respect to RCSB into (Ax,Ay,Az) with respect to RCSA", with
  A = the Registered RCS and B = the Source RCS of the Registration Sequence item.
* PS3.17 O.1: "The Spatial Registration SOP Class specifies a transformation that maps Source
  coordinates, in the Source RCS, to Registered coordinates, in the Registered RCS." (The
  Deformable Spatial Registration SOP Class is the one that maps the other way.)

So each item's matrix maps a point of the item's frame into the current frame:
``p_current = M @ p_prior``. :attr:`models.base.Registration.transform` maps current to prior
(``p_prior = T @ p_current``), hence the prior item carries ``M = inv(T)``. Matrix elements are
written in row-major order (PS3.3 C.20.2).

Registration Sequence, in this order:

1. the current series' Frame of Reference and images, identity matrix, RIGID, registration type
   DCM 125021 "Frame of Reference Identity" (the registered frame is this one);
2. the prior series' Frame of Reference and images, ``inv(T)``, RIGID when the 3x3 part is a
   rotation (orthonormal within :data:`RIGID_TOLERANCE`, determinant > 0) else AFFINE, registration
   type DCM 125024 "Image Content-based Alignment", a comment with model, version and residual.

The Common Instance Reference module lists the current series (this study) and the prior study's
series. UIDs are deterministic (:func:`workers.encode.uids.result_uids`, kind ``SRO``, over the
SOP Instance UIDs of both series); Content Date/Time are the encoding time.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from models.base import ModelResult, Registration
from workers.encode.header import copy_body_part_and_laterality, copy_patient_and_study
from workers.encode.seg import DEFAULT_MANUFACTURER
from workers.encode.series import series_description, series_number
from workers.encode.uids import device_uid, input_fingerprint, result_uids

SRO_KIND = "SRO"
SPATIAL_REGISTRATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.1"
RIGID_TOLERANCE = 1e-4
"""Largest deviation of ``A.T @ A`` from the identity for a 3x3 part still typed RIGID."""
CONTENT_LABEL = "PRIOR_TO_CURRENT"  # CS, at most 16 characters
_LO_MAX = 64

#: CID 7100 "RCS Registration Method" codes (CodeValue, CodingSchemeDesignator, CodeMeaning).
FRAME_OF_REFERENCE_IDENTITY = ("125021", "DCM", "Frame of Reference Identity")
IMAGE_CONTENT_BASED_ALIGNMENT = ("125024", "DCM", "Image Content-based Alignment")

def build_spatial_registration(
    current: Sequence[Dataset], prior: Sequence[Dataset], result: ModelResult, *,
    software_version: str, manufacturer: str = DEFAULT_MANUFACTURER,
) -> Dataset:
    """A Spatial Registration of ``prior`` onto ``current`` from ``result.registration``.

    Args:
        current: the current series' images (the series ``result`` belongs to); only attributes are read.
        prior: the prior series' images the registration was computed from.
        result: a registration result (``result.registration`` set).
        software_version: Software Versions of this node.
        manufacturer: Manufacturer of the creating device (this node).

    Raises:
        ValueError: no registration, a transform that is not a finite invertible affine, frames of
            reference missing, mixed or shared, series mixed, duplicate instances, another patient.
    """
    reg = result.registration
    if reg is None:
        raise ValueError("the result has no registration: nothing to encode as a Spatial Registration")
    current_frame = _check_series("current", current)
    prior_frame = _check_series("prior", prior)
    _check_frames(reg, current_frame, prior_frame)
    _check_same_patient(current[0], prior[0])
    duplicates = {str(d.SOPInstanceUID) for d in current} & {str(d.SOPInstanceUID) for d in prior}
    if duplicates:
        raise ValueError(f"{len(duplicates)} instance(s) are in both the current and the prior series")
    matrix = prior_to_current_matrix(reg.transform)

    first = current[0]
    uids = result_uids(
        str(first.SeriesInstanceUID), result.model_name, result.model_version, SRO_KIND,
        input_fingerprint(str(d.SOPInstanceUID) for d in (*current, *prior)),
    )
    now = datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(SPATIAL_REGISTRATION_STORAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uids.sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # SOP Common
    ds.SOPClassUID = UID(SPATIAL_REGISTRATION_STORAGE)
    ds.SOPInstanceUID = UID(uids.sop_instance_uid)
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    copy_patient_and_study(ds, first)  # Patient, General Study, Patient Study: from the current series
    # General Series, Spatial Registration Series
    ds.Modality = "REG"
    ds.SeriesInstanceUID = UID(uids.series_uid)
    ds.SeriesNumber = series_number(SRO_KIND)
    ds.SeriesDescription = series_description(SRO_KIND, result.model_name)
    copy_body_part_and_laterality(ds, first)
    # Frame of Reference: the Registered RCS is the current series' frame
    ds.FrameOfReferenceUID = current_frame
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", None)
    # General Equipment
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = result.model_name[:_LO_MAX]
    ds.DeviceSerialNumber = device_uid(manufacturer, result.model_name, result.model_version)
    ds.SoftwareVersions = software_version
    # Spatial Registration (with the Content Identification macro)
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.InstanceNumber = 1
    ds.ContentLabel = CONTENT_LABEL
    ds.ContentDescription = (
        f"Prior series registered onto this series by {result.model_name} {result.model_version}"
    )[:_LO_MAX]
    ds.ContentCreatorName = None
    residual = f"{reg.residual_mm:.2f} mm" if np.isfinite(reg.residual_mm) else "n/a"
    ds.RegistrationSequence = DicomSequence([
        _registration_item(current_frame, current, np.eye(4), FRAME_OF_REFERENCE_IDENTITY, None),
        _registration_item(
            prior_frame, prior, matrix, IMAGE_CONTENT_BASED_ALIGNMENT,
            f"{result.model_name} {result.model_version}, residual {residual}",
        ),
    ])
    # Common Instance Reference
    study = str(first.StudyInstanceUID)
    ds.ReferencedSeriesSequence = DicomSequence([_series_reference(current)])
    if str(prior[0].StudyInstanceUID) == study:
        ds.ReferencedSeriesSequence.append(_series_reference(prior))
    else:
        other = Dataset()
        other.StudyInstanceUID = prior[0].StudyInstanceUID
        other.ReferencedSeriesSequence = DicomSequence([_series_reference(prior)])
        ds.StudiesContainingOtherReferencedInstancesSequence = DicomSequence([other])
    return ds


def prior_to_current_matrix(transform: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The matrix of the prior item: ``inv(transform)`` (prior LPS -> current LPS), validated."""
    t = np.asarray(transform, dtype=np.float64)
    if t.shape != (4, 4):
        raise ValueError(f"the registration transform must be 4x4, got shape {t.shape}")
    if not np.isfinite(t).all():
        raise ValueError("the registration transform has non-finite elements")
    if np.abs(t[3] - (0.0, 0.0, 0.0, 1.0)).max() > 1e-9:
        raise ValueError(f"the registration transform is not affine: last row {t[3].tolist()}, expected [0, 0, 0, 1]")
    det = float(np.linalg.det(t[:3, :3]))
    if abs(det) < 1e-6:
        raise ValueError(f"the registration transform is singular (determinant of its 3x3 part {det:.3g})")
    out: npt.NDArray[np.float64] = np.linalg.inv(t).astype(np.float64)
    out[3] = (0.0, 0.0, 0.0, 1.0)
    if not np.isfinite(out).all():
        raise ValueError("the inverse of the registration transform is not finite")
    return out


def matrix_type(matrix: npt.NDArray[np.float64], tolerance: float = RIGID_TOLERANCE) -> str:
    """``RIGID`` when the 3x3 part is a rotation (orthonormal, determinant > 0), else ``AFFINE``."""
    a = np.asarray(matrix, dtype=np.float64)[:3, :3]
    orthonormal = float(np.abs(a.T @ a - np.eye(3)).max()) <= tolerance
    return "RIGID" if orthonormal and np.linalg.det(a) > 0 else "AFFINE"


def _check_series(role: str, datasets: Sequence[Dataset]) -> str:
    """Validate one series; return its Frame of Reference UID."""
    if len(datasets) == 0:
        raise ValueError(f"no {role} images")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(d.get(keyword, "") or "") for d in datasets}
        if "" in values:
            raise ValueError(f"{role} images without {keyword}")
        if len(values) > 1:
            raise ValueError(f"{role} images have {len(values)} different {keyword} values")
    for d in datasets:
        if not d.get("SOPClassUID") or not d.get("SOPInstanceUID"):
            raise ValueError(f"{role} images without SOP Class or SOP Instance UID")
    if len({str(d.SOPInstanceUID) for d in datasets}) != len(datasets):
        raise ValueError(f"duplicate SOP Instance UIDs among the {role} images")
    return str(datasets[0].FrameOfReferenceUID)


def _check_frames(reg: Registration, current_frame: str, prior_frame: str) -> None:
    if not reg.prior_frame_of_reference_uid:
        raise ValueError("the registration has no prior Frame of Reference UID")
    if reg.prior_frame_of_reference_uid != prior_frame:
        raise ValueError(
            f"the registration's prior Frame of Reference {reg.prior_frame_of_reference_uid} is not the prior "
            f"images' {prior_frame}"
        )
    if prior_frame == current_frame:
        raise ValueError(
            "the current and prior series share one Frame of Reference: a registration between them "
            "cannot be told apart from the identity by Frame of Reference"
        )


def _check_same_patient(current: Dataset, prior: Dataset) -> None:
    a, b = str(current.get("PatientID", "") or ""), str(prior.get("PatientID", "") or "")
    if a and b and a != b:
        raise ValueError(f"the prior series belongs to another patient ({b!r}, current {a!r})")


def _code_item(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _registration_item(
    frame: str, images: Sequence[Dataset], matrix: npt.NDArray[np.float64], method: tuple[str, str, str],
    comment: str | None,
) -> Dataset:
    """One Registration Sequence item: the frame, its images and the matrix into the registered frame."""
    transform = Dataset()
    # DS (at most 16 characters a value): about 14 significant digits, far below 1e-6 mm at 1 m.
    transform.FrameOfReferenceTransformationMatrix = [format_number_as_ds(float(v)) for v in matrix.ravel()]
    transform.FrameOfReferenceTransformationMatrixType = matrix_type(matrix)
    registration = Dataset()
    if comment is not None:
        registration.FrameOfReferenceTransformationComment = comment[:_LO_MAX]
    registration.RegistrationTypeCodeSequence = DicomSequence([_code_item(method)])
    registration.MatrixSequence = DicomSequence([transform])
    item = Dataset()
    item.FrameOfReferenceUID = frame
    item.ReferencedImageSequence = DicomSequence([_instance_reference(d) for d in images])
    item.MatrixRegistrationSequence = DicomSequence([registration])
    return item


def _instance_reference(ds: Dataset) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return ref


def _series_reference(images: Sequence[Dataset]) -> Dataset:
    series = Dataset()
    series.SeriesInstanceUID = images[0].SeriesInstanceUID
    series.ReferencedInstanceSequence = DicomSequence([_instance_reference(d) for d in images])
    return series
