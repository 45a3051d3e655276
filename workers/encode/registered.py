"""The registered prior as a derived image series on the current study's frame of reference.

One single-frame image per current slice, with the current slice's geometry (position, orientation,
spacing) and Frame of Reference, the prior's voxels resampled there (``Registration.resampled``).
It belongs to the current study, so a viewer can scroll it side by side with, or fuse it onto, the
current series. Built from the current slice as a template (same IOD, here CT or MR Image), with
Image Type DERIVED\\SECONDARY, a derivation description naming the prior series (the prior lives
in another study, which Source Image references would have to declare through the Common Instance
Reference module; the description keeps the object simple and valid), and deterministic UIDs.
Pixels are JPEG-LS lossless by default: 300 slices of 512 x 512 shrink from 158 MB to about 40 %
for about 6 ms a slice; a destination without JPEG-LS gets them decompressed by the sender.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGLSLossless

from models.base import ModelResult
from workers.encode.series import series_description, series_number
from workers.encode.uids import derive_uid, input_fingerprint, result_uids

REGISTERED_KIND = "REGISTERED-PRIOR"
HU_MIN, HU_MAX = -32768, 32767


def build_registered_prior(
    current: Sequence[Dataset], prior: Sequence[Dataset], result: ModelResult, *,
    series_number: int = series_number(REGISTERED_KIND), software_version: str,
    transfer_syntax_uid: str = JPEGLSLossless, manufacturer: str = "dicom-ai-node",
) -> list[Dataset]:
    """Images of the resampled prior, one per ``current`` slice (``current`` in the volume's k order)."""
    if any("PerFrameFunctionalGroupsSequence" in d or int(d.get("NumberOfFrames") or 1) > 1 for d in current):
        raise ValueError("the registered prior needs single-frame current images as templates (one per slice)")
    reg = result.registration
    if reg is None:
        raise ValueError("the result has no registration")
    if reg.resampled.shape[0] != len(current):
        raise ValueError(f"{reg.resampled.shape[0]} resampled slices for {len(current)} current slices")
    rows, cols = int(current[0].Rows), int(current[0].Columns)
    if reg.resampled.shape[1:] != (rows, cols):
        raise ValueError("resampled prior does not match the current image size")
    source_series = str(current[0].SeriesInstanceUID)
    fingerprint = input_fingerprint([str(d.SOPInstanceUID) for d in (*current, *prior)])
    uids = result_uids(source_series, result.model_name, result.model_version, REGISTERED_KIND, fingerprint)
    out = []
    for k, template in enumerate(current):
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
