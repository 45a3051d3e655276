"""A synthetic MR head (T1- or T2-weighted) with known head and brain masks, and its DICOM writer.

Anatomy (LPS mm, axial slices, k along +z = towards the head): a head ellipsoid on a neck, built of
scalp (fat-rich), skull (no signal), extra-cerebral CSF, a grey-matter cortex whose inner and outer
surfaces are folded by a smooth random field (sulci), white matter, two lateral ventricles (CSF),
and two eyes (fluid) in front of the skull. Brain truth = grey + white matter + ventricles (inside
the pial surface); Head truth = everything that is not air.

Image formation: tissue signal for the weighting (relative values from typical 1.5/3 T spin-echo
contrast, not absolute), a few percent of smooth texture, partial volume (Gaussian blur), a smooth
multiplicative bias field (``bias`` = peak-to-peak fraction), Rician noise (``noise`` = sigma as a
fraction of the white-matter signal), then an arbitrary scanner scale: stored values mean nothing
absolute, as on real MR.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage
from scipy import ndimage

from models.base import Volume
from testkit.phantom import phantom_uid

Weighting = Literal["T1", "T2"]

AIR, SCALP, SKULL, CSF, GREY, WHITE, VENTRICLE, EYE, NECK = range(9)
MR_TRUTH: dict[str, tuple[int, ...]] = {
    "Head": (SCALP, SKULL, CSF, GREY, WHITE, VENTRICLE, EYE, NECK),
    "Brain": (GREY, WHITE, VENTRICLE),
    "Intracranial": (CSF, GREY, WHITE, VENTRICLE),
}
"""Truth name -> tissue labels."""

SIGNAL: dict[Weighting, dict[int, float]] = {
    "T1": {AIR: 0.0, SCALP: 1.05, SKULL: 0.04, CSF: 0.22, GREY: 0.62, WHITE: 1.0, VENTRICLE: 0.2, EYE: 0.25,
           NECK: 0.55},
    "T2": {AIR: 0.0, SCALP: 0.75, SKULL: 0.04, CSF: 1.6, GREY: 0.95, WHITE: 0.7, VENTRICLE: 1.65, EYE: 1.7,
           NECK: 0.45},
}
"""Relative signal per tissue (white matter of T1 = 1); T2: CSF brightest, white darker than grey."""
ECHO_REPETITION_MS: dict[Weighting, tuple[float, float]] = {"T1": (12.0, 500.0), "T2": (100.0, 4000.0)}


@dataclass(frozen=True)
class MrPhantom:
    """A synthetic MR head: ``signal`` (k, j, i) uint16 as stored, ``labels`` the tissue of each voxel."""

    signal: npt.NDArray[np.uint16]
    labels: npt.NDArray[np.uint8]
    pixel_mm: float
    slice_mm: float
    origin_lps: tuple[float, float, float]
    weighting: Weighting
    seed: int

    @property
    def shape(self) -> tuple[int, int, int]:
        k, j, i = self.signal.shape
        return int(k), int(j), int(i)

    @property
    def affine(self) -> npt.NDArray[np.float64]:
        a = np.diag([self.pixel_mm, self.pixel_mm, self.slice_mm, 1.0])
        a[:3, 3] = self.origin_lps
        return a

    @property
    def voxel_ml(self) -> float:
        return self.pixel_mm * self.pixel_mm * self.slice_mm / 1000.0

    def truth(self, name: str) -> npt.NDArray[np.bool_]:
        """Boolean truth mask (k, j, i): ``Head``, ``Brain`` or ``Intracranial``."""
        return np.isin(self.labels, MR_TRUTH[name])

    def truth_ml(self, name: str) -> float:
        return float(self.truth(name).sum()) * self.voxel_ml

    def to_volume(self) -> Volume:
        n = self.shape[0]
        return Volume(
            voxels=self.signal.astype(np.float32),
            affine=self.affine,
            modality="MR",
            sop_instance_uids=tuple(phantom_uid(self.seed, "mr-sop", str(k)) for k in range(n)),
            frame_of_reference_uid=phantom_uid(self.seed, "mr-for"),
        )


def make_mr_phantom(
    weighting: Weighting = "T1",
    *,
    shape: tuple[int, int, int] = (36, 128, 128),
    pixel_mm: float = 1.8,
    slice_mm: float = 4.5,
    noise: float = 0.03,
    bias: float = 0.3,
    seed: int = 0,
) -> MrPhantom:
    """Build a head phantom (see the module docstring); deterministic for a given ``seed``."""
    rng = np.random.default_rng(seed)
    n, rows, cols = shape
    origin = (-(cols - 1) * pixel_mm / 2.0, -(rows - 1) * pixel_mm / 2.0, -(n - 1) * slice_mm / 2.0)
    z, y, x = np.meshgrid(
        origin[2] + slice_mm * np.arange(n), origin[1] + pixel_mm * np.arange(rows),
        origin[0] + pixel_mm * np.arange(cols), indexing="ij",
    )
    scale = 1.0 + 0.06 * rng.uniform(-1, 1)
    a, b, c = 72.0 * scale, 92.0 * scale, 78.0 * scale  # half-axes: left-right, front-back, feet-head
    cz = 10.0 + rng.uniform(-4, 4)
    head = (x / a) ** 2 + (y / b) ** 2 + ((z - cz) / c) ** 2 <= 1.0
    neck = ((x / (a * 0.62)) ** 2 + ((y - 12.0) / (b * 0.55)) ** 2 <= 1.0) & (z < cz - 0.55 * c)
    body = head | neck
    sampling = (slice_mm, pixel_mm, pixel_mm)
    depth = ndimage.distance_transform_edt(head, sampling=sampling)  # mm inside the head surface
    folds = _smooth_field(rng, shape, sampling, 12.0) * 2.2  # sulci: +-2 mm on the cortex surfaces
    scalp_t, skull_t, csf_t, grey_t = 5.0 + rng.uniform(-1, 1), 6.5 + rng.uniform(-1, 1), 2.5, 3.5
    labels = np.full(shape, AIR, dtype=np.uint8)
    labels[body] = NECK
    labels[head] = SCALP
    labels[head & (depth > scalp_t)] = SKULL
    inner = scalp_t + skull_t
    labels[head & (depth > inner)] = CSF
    labels[head & (depth > inner + csf_t + folds)] = GREY
    labels[head & (depth > inner + csf_t + grey_t + 1.5 * folds)] = WHITE
    for side in (-1.0, 1.0):  # lateral ventricles
        vent = (((x - side * 9.0) / 7.0) ** 2 + ((y + 2.0) / 26.0) ** 2 + ((z - cz - 12.0) / 13.0) ** 2) <= 1.0
        labels[vent & head] = VENTRICLE
        eye = ((x - side * 31.0) ** 2 + (y + b * 0.95) ** 2 + (z - cz + 0.3 * c) ** 2) <= 12.0**2
        labels[eye & np.isin(labels, (AIR, SCALP, SKULL))] = EYE
    table = np.zeros(16, dtype=np.float32)
    for tissue, value in SIGNAL[weighting].items():
        table[tissue] = value
    clean = table[labels] * (1.0 + 0.04 * _smooth_field(rng, shape, sampling, 4.0))
    clean = ndimage.gaussian_filter(clean, sigma=(0.35, 0.6, 0.6))  # partial volume
    field = np.exp(bias / 2.0 * _smooth_field(rng, shape, sampling, 60.0, normalise=True))
    clean *= field
    sigma = noise  # white matter of T1 = 1
    noisy = np.hypot(clean + sigma * rng.standard_normal(shape), sigma * rng.standard_normal(shape))
    gain = rng.uniform(300.0, 1800.0)  # arbitrary scanner scale
    signal = np.clip(np.rint(noisy * gain), 0, 4095).astype(np.uint16)
    return MrPhantom(signal, labels, pixel_mm, slice_mm, origin, weighting, seed)


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, int, int], sampling: tuple[float, float, float], mm: float,
    *, normalise: bool = False,
) -> npt.NDArray[np.float32]:
    """Smooth random field of unit standard deviation (or in [-1, 1] with ``normalise``), scale ``mm``."""
    raw = rng.standard_normal(shape).astype(np.float32)
    field = ndimage.gaussian_filter(raw, sigma=tuple(mm / s for s in sampling), mode="reflect")
    if normalise:
        span = float(np.abs(field).max()) or 1.0
        return (field / span).astype(np.float32)
    return (field / (float(field.std()) or 1.0)).astype(np.float32)


def write_mr_series(
    phantom: MrPhantom,
    out_dir: str | Path,
    *,
    patient_id: str = "MR-PHANTOM-001",
    study_uid: str | None = None,
    series_description: str | None = None,
    uid_seed: str | None = None,
) -> list[Path]:
    """Write ``phantom`` as an MR Image Storage series (one file per slice, axial, head first)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = uid_seed or f"mr-{phantom.seed}-{phantom.weighting}"
    study_uid = study_uid or phantom_uid(seed, "study", patient_id)
    series_uid = phantom_uid(seed, "series", patient_id)
    for_uid = phantom_uid(seed, "for", patient_id)
    te, tr = ECHO_REPETITION_MS[phantom.weighting]
    paths: list[Path] = []
    n = phantom.shape[0]
    for k in range(n):
        ds = Dataset()
        sop_uid = phantom_uid(seed, "sop", patient_id, str(k))
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^MR", patient_id, "", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, "20240101", "120000"
        ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "1", ""
        ds.StudyDescription = "Synthetic MR head"
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "MR", series_uid, 3 if phantom.weighting == "T1" else 4
        ds.SeriesDescription = series_description or f"AX {phantom.weighting} SE"
        ds.BodyPartExamined, ds.PatientPosition = "HEAD", "HFS"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = for_uid, ""
        ds.Manufacturer, ds.ManufacturerModelName = "dicom-ai-node", "synthetic phantom"
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ipp = phantom.affine[:3, :3] @ np.array([0.0, 0.0, k]) + phantom.affine[:3, 3]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = f"{ipp[2]:.4f}"
        ds.PixelSpacing = [f"{phantom.pixel_mm:g}", f"{phantom.pixel_mm:g}"]
        ds.SliceThickness = f"{phantom.slice_mm:g}"
        ds.SpacingBetweenSlices = f"{phantom.slice_mm:g}"
        # MR Image module (C.8.3.1)
        ds.ScanningSequence, ds.SequenceVariant = "SE", "NONE"
        ds.ScanOptions, ds.MRAcquisitionType = "", "2D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = f"{tr:g}", f"{te:g}", "1"
        ds.MagneticFieldStrength = "1.5"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = phantom.shape[1], phantom.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.ascontiguousarray(phantom.signal[k]).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out / f"MR{k + 1:05d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
