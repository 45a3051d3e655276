"""The registered prior as a derived image series on the current study's frame of reference.

One single-frame image per current slice, with the current slice's geometry (position, orientation,
spacing) and Frame of Reference, the prior's voxels resampled there (``Registration.resampled``).
It belongs to the current study, so a viewer can scroll it side by side with, or fuse it onto, the
current series. Built from the current slice as a template (same IOD, here CT or MR Image), with
Image Type DERIVED\\SECONDARY, a derivation description naming the prior series (the prior lives
in another study, which Source Image references would have to declare through the Common Instance
Reference module; the description keeps the object simple and valid), and deterministic UIDs.
A multi-frame current CT (Enhanced or Legacy Converted Enhanced) gets single-frame CT images too,
built from its patient/study/frame-of-reference attributes and the volume's plane geometry.
Pixels are JPEG-LS lossless by default: 300 slices of 512 x 512 shrink from 158 MB to about 40 %
for about 6 ms a slice; a destination without JPEG-LS gets them decompressed by the sender.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, JPEGLSLossless
from pydicom.valuerep import format_number_as_ds

from models.base import ModelResult, Volume
from workers.encode.header import copy_body_part_and_laterality, copy_patient_and_study
from workers.encode.series import series_description, series_number
from workers.encode.uids import derive_uid, input_fingerprint, result_uids

REGISTERED_KIND = "REGISTERED-PRIOR"
HU_MIN, HU_MAX = -32768, 32767


def build_registered_prior(
    current: Sequence[Dataset], prior: Sequence[Dataset], result: ModelResult, *,
    series_number: int = series_number(REGISTERED_KIND), software_version: str,
    transfer_syntax_uid: str = JPEGLSLossless, manufacturer: str = "dicom-ai-node",
    volume: Volume | None = None,
) -> list[Dataset]:
    """Images of the resampled prior, one per current slice (``current`` in the volume's k order).

    When the current series is one multi-frame CT image (Enhanced or Legacy Converted Enhanced CT),
    pass its ``volume``: the slices become single-frame CT images whose geometry comes from the
    volume (the frames' own positions), with the patient, study and frame of reference of the image.
    """
    reg = result.registration
    if reg is None:
        raise ValueError("the result has no registration")
    if any("PerFrameFunctionalGroupsSequence" in d or int(d.get("NumberOfFrames") or 1) > 1 for d in current):
        if len(current) != 1 or volume is None:
            raise ValueError("a multi-frame current series must be one image, given with its volume")
        templates = _single_frame_templates(current[0], volume)
    else:
        templates = list(current)
    if reg.resampled.shape[0] != len(templates):
        raise ValueError(f"{reg.resampled.shape[0]} resampled slices for {len(templates)} current slices")
    rows, cols = int(current[0].Rows), int(current[0].Columns)
    if reg.resampled.shape[1:] != (rows, cols):
        raise ValueError("resampled prior does not match the current image size")
    source_series = str(current[0].SeriesInstanceUID)
    fingerprint = input_fingerprint([str(d.SOPInstanceUID) for d in (*current, *prior)])
    uids = result_uids(source_series, result.model_name, result.model_version, REGISTERED_KIND, fingerprint)
    out = []
    for k, template in enumerate(templates):
        ds = Dataset()
        for elem in template:
            if elem.tag.group in (0x7FE0,) or elem.keyword in _DROPPED:
                continue
            ds.add(copy.deepcopy(elem))
        ds.file_meta = copy.deepcopy(template.file_meta)
        sop_uid = UID(derive_uid("slice", uids.sop_instance_uid, str(k)))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SeriesInstanceUID = uids.series_uid
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = series_description(REGISTERED_KIND, result.model_name)
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"] if template.get("Modality") == "CT" else [
            "DERIVED", "SECONDARY"]
        ds.DerivationDescription = (
            f"Prior series {prior[0].SeriesInstanceUID} registered onto this frame of reference by "
            f"{result.model_name} {result.model_version}; residual {reg.residual_mm:.2f} mm"
        )[:1024]
        ds.Manufacturer = manufacturer
        ds.SoftwareVersions = software_version
        pixels = np.clip(np.rint(reg.resampled[k]), HU_MIN, HU_MAX).astype(np.int16)
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW"
        if transfer_syntax_uid != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax_uid, pixels)  # lossless; the sender decompresses for a PACS without it
        out.append(ds)
    return out


_DROPPED = frozenset({
    "SOPInstanceUID", "SeriesInstanceUID", "SeriesNumber", "InstanceNumber", "SeriesDescription",
    "ImageType", "DerivationDescription", "SourceImageSequence", "ReferencedImageSequence",
    "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod",
    "SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingValue", "ReferencedSeriesSequence",
    "ContentDate", "ContentTime", "ProcedureCodeSequence",
})
"""Attributes of the template slice that do not describe the derived image."""


def _single_frame_templates(image: Dataset, volume: Volume) -> list[Dataset]:
    """CT Image templates, one per slice in k order, for a multi-frame CT current image: patient,
    study, series, frame of reference and equipment from the image, plane geometry from the volume."""
    if str(image.get("Modality", "")) != "CT" or volume.modality != "CT":
        raise ValueError("a registered prior on a multi-frame current series is written for CT only")
    if volume.frame_of_reference_uid != str(image.FrameOfReferenceUID):
        raise ValueError("the volume is not on the image's frame of reference")
    base = Dataset()
    base.file_meta = FileMetaDataset()
    base.file_meta.MediaStorageSOPClassUID = CTImageStorage
    base.SOPClassUID = CTImageStorage
    copy_patient_and_study(base, image)
    base.Modality = "CT"
    base.SeriesInstanceUID = image.SeriesInstanceUID  # replaced by the derived series' UID
    copy_body_part_and_laterality(base, image)
    base.PatientPosition = image.get("PatientPosition", None)  # General Series, Type 2C for CT
    base.FrameOfReferenceUID = image.FrameOfReferenceUID
    base.PositionReferenceIndicator = image.get("PositionReferenceIndicator", None)
    base.KVP = _first_in_groups(image, "CTXRayDetailsSequence", "KVP")  # CT Image, Type 2
    base.AcquisitionNumber = None  # Type 2
    affine = volume.affine
    along_row, along_column = affine[:3, 0], affine[:3, 1]  # i: next column, j: next row
    base.ImageOrientationPatient = [format_number_as_ds(float(v)) for v in (
        *(along_row / np.linalg.norm(along_row)), *(along_column / np.linalg.norm(along_column)))]
    base.PixelSpacing = [format_number_as_ds(float(np.linalg.norm(v))) for v in (along_column, along_row)]
    thickness = _first_in_groups(image, "PixelMeasuresSequence", "SliceThickness")
    base.SliceThickness = thickness if thickness is not None else format_number_as_ds(volume.spacing[0])
    base.Rows, base.Columns = image.Rows, image.Columns
    out = []
    for k in range(volume.voxels.shape[0]):
        ds = copy.deepcopy(base)
        ds.ImagePositionPatient = [format_number_as_ds(float(v)) for v in (affine @ [0.0, 0.0, k, 1.0])[:3]]
        out.append(ds)
    return out


def _first_in_groups(image: Dataset, sequence: str, keyword: str) -> object:
    """``keyword`` from the shared functional groups' ``sequence``, else from the first frame's."""
    for groups in (image.get("SharedFunctionalGroupsSequence"), image.get("PerFrameFunctionalGroupsSequence")):
        if groups and sequence in groups[0] and groups[0][sequence].value:
            value = groups[0][sequence][0].get(keyword)
            if value not in (None, ""):
                return value
    return None
