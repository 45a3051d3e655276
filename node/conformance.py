"""What the node speaks in DICOM: the SOP classes and transfer syntaxes it accepts, the query/retrieve
classes it uses for priors, and the newer result classes its senders negotiate per destination.

One table each, shared by the Storage SCP (:mod:`node.receive.scp`), the STOW-RS door, the prior
retriever (:mod:`node.retrieve`), the senders (:mod:`node.send`) and the encoders (``workers.encode``).
"""

from __future__ import annotations

from pydicom import uid as sc
from pydicom import uid as tsuid

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

STORAGE_SOP_CLASSES: tuple[str, ...] = (
    sc.CTImageStorage,
    sc.EnhancedCTImageStorage,
    sc.LegacyConvertedEnhancedCTImageStorage,
    sc.MRImageStorage,
    sc.EnhancedMRImageStorage,
    sc.LegacyConvertedEnhancedMRImageStorage,
    sc.PositronEmissionTomographyImageStorage,
    sc.EnhancedPETImageStorage,
    sc.ComputedRadiographyImageStorage,
    sc.DigitalXRayImageStorageForPresentation,
    sc.DigitalXRayImageStorageForProcessing,
    sc.SecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    sc.MultiFrameTrueColorSecondaryCaptureImageStorage,
    sc.MultiFrameSingleBitSecondaryCaptureImageStorage,
)
"""Image storage classes we accept (the node analyses images, it is not a general archive)."""

TRANSFER_SYNTAXES: tuple[str, ...] = (
    tsuid.ExplicitVRLittleEndian,
    tsuid.ImplicitVRLittleEndian,
    tsuid.DeflatedExplicitVRLittleEndian,
    tsuid.ExplicitVRBigEndian,
    tsuid.JPEGBaseline8Bit,
    tsuid.JPEGExtended12Bit,
    tsuid.JPEGLossless,
    tsuid.JPEGLosslessSV1,
    tsuid.JPEGLSLossless,
    tsuid.JPEGLSNearLossless,
    tsuid.JPEG2000Lossless,
    tsuid.JPEG2000,
    tsuid.RLELossless,
)
"""Accepted as sent (stored without transcoding); the workers decode them."""

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
"""Segmentation Storage (BINARY / FRACTIONAL SEG): what every PACS of the last 15 years knows."""
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
"""Label Map Segmentation Storage: newer than most PACS (dcmtk 3.6.7 and Orthanc 1.10 refuse it over
DIMSE), so a LABELMAP SEG is written with a BINARY copy and the sender picks per association."""
UNCOMPRESSED_TRANSFER_SYNTAXES: tuple[str, ...] = (tsuid.ExplicitVRLittleEndian, tsuid.ImplicitVRLittleEndian)
"""Offered beside a compressed syntax so that every destination can take a result."""
