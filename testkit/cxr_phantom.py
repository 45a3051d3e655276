"""A synthetic PA chest radiograph with known lung fields, heart width and thoracic width, and its writer.

Geometry (mm in the patient plane; image columns run towards the patient's left, rows towards the
feet, as a PA chest is displayed): two lung fields bounded by the rib cage laterally (rounded apices,
sharp costophrenic angles), the mediastinum and the heart (an ellipse, shifted to the patient's left)
medially and the diaphragm domes below (the right dome higher). The lung-field truth excludes the
heart and the mediastinum, as in the JSRT/Montgomery reference masks. Truth heart width = the
heart's largest horizontal extent; truth thoracic width = the largest distance between the lateral
lung edges (the inner rib margins); CTR = their ratio.

Image: a density map (soft tissue, air in the lungs, mediastinum, spine, heart, abdomen below the
diaphragm, posterior ribs and clavicles), blurred and with quantum noise, shown dense = bright. The
writer stores it as DX (For Presentation) or CR, MONOCHROME2 or MONOCHROME1 (inverted values),
optionally with a non-linear VOI LUT Sequence, ImagerPixelSpacing = patient pixel size x the
magnification, and EstimatedRadiographicMagnificationFactor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)
from scipy import ndimage

from models.base import Volume
from testkit.phantom import phantom_uid


@dataclass(frozen=True)
class CxrPhantom:
    """``image`` (rows, columns) float32, dense = bright in [0, 1]; truth lung masks and widths (mm)."""

    image: npt.NDArray[np.float32]
    right_lung: npt.NDArray[np.bool_]
    left_lung: npt.NDArray[np.bool_]
    pixel_mm: float
    heart_width_mm: float
    thoracic_width_mm: float
    seed: int

    @property
    def ctr(self) -> float:
        return self.heart_width_mm / self.thoracic_width_mm

    def to_volume(self, modality: str = "DX") -> Volume:
        """The image as a one-slice Volume (columns towards patient left +x, rows towards the feet -z)."""
        affine = np.zeros((4, 4))
        affine[:3, 0] = (self.pixel_mm, 0.0, 0.0)
        affine[:3, 1] = (0.0, 0.0, -self.pixel_mm)
        affine[:3, 2] = (0.0, 1.0, 0.0)
        affine[3, 3] = 1.0
        return Volume(
            voxels=self.image[np.newaxis].astype(np.float32),
            affine=affine,
            modality=modality,
            sop_instance_uids=(phantom_uid(self.seed, "cxr-sop"),),
            frame_of_reference_uid="",
        )


def make_cxr_phantom(
    *, size: int = 900, pixel_mm: float = 0.45, ctr: float | None = None, noise: float = 0.015, seed: int = 0,
) -> CxrPhantom:
    """Build a chest radiograph; ``ctr`` sets the heart width (default: random in 0.38-0.62)."""
    rng = np.random.default_rng(seed)
    extent = size * pixel_mm
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) * pixel_mm
    x0 = extent / 2.0 + rng.uniform(-8, 8)
    half_thorax = rng.uniform(125.0, 145.0)  # inner rib margin to the midline
    ratio = float(ctr) if ctr is not None else rng.uniform(0.38, 0.62)
    heart_w = ratio * 2.0 * half_thorax
    y_top = extent * 0.14 + rng.uniform(-5, 5)  # lung apices
    y_base = extent * 0.76 + rng.uniform(-6, 6)  # costophrenic angles
    s = np.clip((y - y_top) / (y_base - y_top), 0.0, 1.0)
    reach = half_thorax * (0.45 + 0.55 * np.sqrt(np.clip(s / 0.65, 0.0, 1.0)))
    apex_round = np.sqrt(np.clip((y - y_top) / 25.0, 0.0, 1.0))
    heart_h = heart_w * rng.uniform(0.72, 0.82)
    heart_cx = x0 + heart_w * 0.18
    heart_cy = y_base - heart_h / 2.0 - 36.0  # its lower border merges with the diaphragm
    heart = ((x - heart_cx) / (heart_w / 2.0)) ** 2 + ((y - heart_cy) / (heart_h / 2.0)) ** 2 <= 1.0
    mediastinum = np.abs(x - x0) <= 24.0
    domes = {}
    for side, sign, lift in (("right", -1.0, 16.0), ("left", 1.0, 2.0)):
        cx = x0 + sign * half_thorax * 0.5
        domes[side] = y_base - 10.0 - lift - 38.0 * np.clip(1.0 - ((x - cx) / (half_thorax * 0.75)) ** 2, 0.0, 1.0)
    lungs = {}
    for side, sign in (("right", -1.0), ("left", 1.0)):
        lateral = sign * (x - x0) <= reach * apex_round
        lungs[side] = (sign * (x - x0) > 0) & lateral & (y >= y_top) & (y <= domes[side]) & ~mediastinum & ~heart
    body = (np.abs(x - x0) <= half_thorax + 24.0 + 0.06 * np.maximum(0.0, y - y_top)) & (y >= y_top - 60.0)
    density = 0.35 * body.astype(np.float64)
    density += 0.35 * (body & (y > np.minimum(domes["right"], domes["left"])) & ~lungs["right"] & ~lungs["left"])
    density += 0.25 * (mediastinum & body)
    density += 0.3 * (np.abs(x - x0) <= 11.0) * body  # spine
    density += 0.2 * heart
    for side in ("right", "left"):
        density -= 0.22 * lungs[side]
    for n in range(10):  # posterior ribs: arcs across each hemithorax
        yc = y_top - 10.0 + n * (y_base - y_top + 20.0) / 9.5
        for sign in (-1.0, 1.0):
            arc = yc + 22.0 * (1.0 - ((x - x0) / half_thorax) ** 2) - 0.15 * sign * (x - x0)
            rib = (np.abs(y - arc) <= 4.5) & (sign * (x - x0) > 14.0) & (np.abs(x - x0) <= half_thorax + 14) & body
            density += 0.07 * rib
    clav = (np.abs(y - (y_top + 8.0 + 0.25 * np.abs(x - x0))) <= 5.0) & (np.abs(x - x0) < half_thorax) & body
    density += 0.1 * clav
    density = ndimage.gaussian_filter(density, 1.2 / pixel_mm)
    density += noise * rng.standard_normal(density.shape) + 0.02
    image = np.clip(density / max(1e-6, float(density.max())), 0.0, 1.0).astype(np.float32)
    return CxrPhantom(
        image=image,
        right_lung=lungs["right"],
        left_lung=lungs["left"],
        pixel_mm=pixel_mm,
        heart_width_mm=_width(heart, pixel_mm),
        thoracic_width_mm=_width(lungs["right"] | lungs["left"], pixel_mm, outer=True),
        seed=seed,
    )


def _width(mask: npt.NDArray[np.bool_], pixel_mm: float, *, outer: bool = False) -> float:
    """Largest horizontal extent (mm) of ``mask`` over its rows (``outer``: first to last pixel of each row)."""
    best = 0.0
    for row in mask:
        cols = np.flatnonzero(row)
        if cols.size:
            best = max(best, (cols[-1] - cols[0] + 1) * pixel_mm)
    return best


Photometric = Literal["MONOCHROME1", "MONOCHROME2"]


def write_cxr(
    phantom: CxrPhantom,
    path: str | Path,
    *,
    modality: Literal["DX", "CR"] = "DX",
    photometric: Photometric = "MONOCHROME2",
    voi_lut: bool = False,
    magnification: float | None = 1.1,
    view_position: str = "PA",
    patient_id: str = "CXR-PHANTOM-001",
    study_uid: str | None = None,
    uid_seed: str | None = None,
) -> Path:
    """Write the radiograph as one DX (For Presentation) or CR image; returns ``path``."""
    seed = uid_seed or f"cxr-{phantom.seed}-{modality}-{photometric}-{voi_lut}-{magnification}-{view_position}"
    sop_class = DigitalXRayImageStorageForPresentation if modality == "DX" else ComputedRadiographyImageStorage
    stored = np.rint(phantom.image * 3800.0 + 150.0).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = (4095 - stored).astype(np.uint16)
    ds = Dataset()
    sop_uid = phantom_uid(seed, "sop", patient_id)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Chest", patient_id, "", "O"
    ds.StudyInstanceUID = study_uid or phantom_uid(seed, "study", patient_id)
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = (
        "20240101", "120000", "", "1", "")
    ds.StudyDescription = "Synthetic chest radiograph"
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, phantom_uid(seed, "series", patient_id), 1
    ds.SeriesDescription = f"CHEST {view_position}"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", view_position
    ds.Manufacturer, ds.ManufacturerModelName = "dicom-ai-node", "synthetic phantom"
    ds.InstanceNumber, ds.PatientOrientation = 1, ["L", "F"]
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDate, ds.AcquisitionTime = "20240101", "120000", "20240101", "120000"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImageLaterality = "U"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = phantom.image.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.LossyImageCompression = "00"
    mag = magnification or 1.0
    ds.ImagerPixelSpacing = [f"{phantom.pixel_mm * mag:.6g}"] * 2
    if magnification is not None:
        ds.EstimatedRadiographicMagnificationFactor = f"{magnification:g}"
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
        ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
        ds.DetectorType = "SCINTILLATOR"
        ds.BurnedInAnnotation = "NO"
    if voi_lut:  # a non-linear (gamma) VOI LUT over the stored range, as CR/DX readers often send
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 12]
        item.LUTExplanation = "GAMMA 0.6"
        item.add_new(0x00283006, "US", np.rint(4095 * (np.arange(4096) / 4095.0) ** 0.6).astype(int).tolist())
        ds.VOILUTSequence = [item]
    else:
        ds.WindowCenter, ds.WindowWidth = "2048", "4096"
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)
    return path
