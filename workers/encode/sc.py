"""Key images of a result as DICOM Secondary Capture (RGB) images in the source study.

One SC image per :func:`workers.encode.render.key_slices` slice, rendered by
:func:`workers.encode.render.render_key_images`: what a radiologist sees first on a PACS that shows
neither SEG nor SR. Each image has the source study's patient and study attributes, Series Number
and Description of kind ``SC`` (:mod:`workers.encode.series`), deterministic UIDs (a rerun on the
same input replaces, not duplicates, them), Pixel Spacing of the source slice (divided by the
render scale, so distances measured on the image are right), Patient Orientation, and a Source
Image Sequence item naming the source slice it shows.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DS

from models.base import ModelResult, Volume
from workers.encode.header import copy_body_part_and_laterality
from workers.encode.render import KeyImage, render_key_images, source_slice_labels
from workers.encode.seg import DEFAULT_MANUFACTURER, EmptyResultError
from workers.encode.series import series_description, series_number
from workers.encode.uids import derive_uid, device_uid, input_fingerprint, result_uids

SC_KIND = "SC"
_LO_MAX = 64
#: Purpose of Reference (CID 7202): Source image for image processing operation.
_SOURCE_IMAGE_PURPOSE = hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")
_LPS_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))  # negative, positive direction along x, y, z
#: Body Part Examined defined terms (PS3.16 CID 4031) of unpaired structures: no Laterality then.
def orientation_letter(direction: npt.ArrayLike) -> str:
    """The patient direction (R/L, A/P, F/H) closest to an LPS ``direction`` vector."""
    v = np.asarray(direction, dtype=np.float64)
    axis = int(np.argmax(np.abs(v)))
    return _LPS_LETTERS[axis][int(v[axis] > 0)]


def key_image_uid(sc_sop_instance_uid: str, index: int) -> str:
    """SOP Instance UID of the ``index``-th (1-based) key image of a result."""
    return derive_uid("key-image", sc_sop_instance_uid, str(index))


def build_key_images(
    sources: Sequence[Dataset],
    volume: Volume,
    result: ModelResult,
    *,
    software_version: str,
    manufacturer: str = DEFAULT_MANUFACTURER,
    max_images: int = 4,
    rendered: Sequence[KeyImage] | None = None,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
) -> list[Dataset]:
    """Secondary Capture images (RGB, 8 bit) of the key slices of ``result`` on ``volume``.

    Args:
        sources: the source images in the volume's k order (``sources[k]`` holds slice ``k``), or one
            multi-frame image whose frame ``volume.source_frames[k]`` holds slice ``k``. Only attributes are read.
        volume: the volume the model ran on.
        result: the model result.
        software_version, manufacturer: this node, as the creating device.
        max_images: at most this many images.
        rendered: images already rendered by :func:`~workers.encode.render.render_key_images` (to share
            them with the PDF report); rendered here when ``None``.
        transfer_syntax_uid: one highdicom accepts for RGB SC images (default uncompressed).

    Raises:
        EmptyResultError: nothing to show (no non-empty segment, detection, classification or registration).
        ValueError: sources that do not match the volume.
    """
    n = volume.voxels.shape[0]
    multi_frame = len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) == n and n > 1
    if len(sources) != n and not multi_frame:
        raise ValueError(f"{len(sources)} sources for a volume of {n} slices")
    if rendered is None:
        rendered = render_key_images(
            volume, result, max_images=max_images, slice_labels=source_slice_labels(sources, volume)
        )
    if not rendered:
        raise EmptyResultError("nothing to show: no segment voxels, detections, classifications or registration")
    uids = result_uids(
        str(sources[0].SeriesInstanceUID), result.model_name, result.model_version, SC_KIND,
        input_fingerprint(str(ds.SOPInstanceUID) for ds in sources),
    )
    _, row_mm, col_mm = volume.spacing  # between rows (j), between columns (i)
    orientation = (orientation_letter(volume.affine[:3, 0]), orientation_letter(volume.affine[:3, 1]))
    images: list[Dataset] = []
    for index, shot in enumerate(rendered[:max_images], start=1):
        source = sources[0] if multi_frame else sources[shot.slice_index]
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=np.ascontiguousarray(shot.pixels, dtype=np.uint8),
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=uids.series_uid,
            series_number=series_number(SC_KIND),
            sop_instance_uid=key_image_uid(uids.sop_instance_uid, index),
            instance_number=index,
            manufacturer=manufacturer,
            patient_orientation=orientation,
            transfer_syntax_uid=transfer_syntax_uid,
            series_description=series_description(SC_KIND, result.model_name),
            manufacturer_model_name=result.model_name[:_LO_MAX],
            software_versions=software_version,
            device_serial_number=device_uid(manufacturer, result.model_name, result.model_version),
        )
        image.PixelSpacing = [DS(row_mm / shot.scale, auto_format=True), DS(col_mm / shot.scale, auto_format=True)]
        image.ConversionType = "WSD"  # rendered by this node (workstation), not captured from a video signal
        image.SecondaryCaptureDeviceManufacturer = manufacturer
        image.SecondaryCaptureDeviceManufacturerModelName = result.model_name[:_LO_MAX]
        image.SecondaryCaptureDeviceSoftwareVersions = software_version
        image.BurnedInAnnotation = "YES"
        copy_body_part_and_laterality(image, source)
        image.DerivationDescription = (
            f"{shot.caption}; findings of {result.model_name} {result.model_version} drawn on the source image"
        )[:1024]
        item = Dataset()
        item.ReferencedSOPClassUID = source.SOPClassUID
        item.ReferencedSOPInstanceUID = source.SOPInstanceUID
        if multi_frame:  # the frame that holds the slice (Volume.source_frames; frame order if absent)
            frames = volume.source_frames
            item.ReferencedFrameNumber = frames[shot.slice_index] if frames is not None else shot.slice_index + 1
        item.PurposeOfReferenceCodeSequence = [_SOURCE_IMAGE_PURPOSE]
        image.SourceImageSequence = [item]
        images.append(image)
    return images
