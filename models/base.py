"""The model contract: what a model receives, what it returns, and how it describes itself.

Models know nothing of DICOM files, networks or queues. They take a :class:`Volume` (voxels on
patient geometry) and return a :class:`ModelResult` whose findings carry plain coded concepts;
``workers.encode`` turns those into DICOM objects.

Index conventions (used everywhere in the project):
    ``Volume.voxels[k, j, i]``: k = slice, j = row, i = column.
    ``Volume.affine`` maps the homogeneous voxel index ``(i, j, k, 1)`` to patient LPS millimetres.
    Slices are sorted so that k increases along the slice normal (row x column direction cosines).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeGuard

import numpy as np
import numpy.typing as npt

from models.errors import ModelError, UnsuitableInput

__all__ = ["ModelError", "UnsuitableInput"]  # re-exported: the model contract names them

Family = Literal["segmentation", "detection", "classification", "registration"]
OutputObject = Literal["SEG", "SR", "SC", "PDF", "REG"]
"""What a model's results become (workers/outputs.py): SEG, TID 1500 SR, key-image Secondary
Captures, an Encapsulated PDF report, REG = registered prior series + Spatial Registration."""


@dataclass(frozen=True)
class Code:
    """A coded concept, e.g. ``Code("10200004", "SCT", "Liver")``."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Volume:
    """One series as a 3-D array on patient coordinates.

    Attributes:
        voxels: float32, shape (slices, rows, columns); Hounsfield units for CT (rescale applied).
        affine: 4x4 float64 matrix, (i, j, k, 1) -> LPS mm.
        modality: DICOM Modality of the source series (``CT``, ``MR``...).
        sop_instance_uids: the source instance of each slice, in k order.
        frame_of_reference_uid: the source Frame of Reference UID.
        source_frames: when the series is ONE multi-frame image (Enhanced or Legacy Converted
            Enhanced CT/MR...): the 1-based frame number of each slice, in k order (a permutation of
            1..slices; frames are sorted along the slice normal like single-frame slices). None for
            single-frame slices.
    """

    voxels: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    modality: str
    sop_instance_uids: tuple[str, ...]
    frame_of_reference_uid: str
    source_frames: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.voxels.ndim != 3:
            raise ValueError(f"voxels must be 3-D, got shape {self.voxels.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError("affine must be 4x4")
        if len(self.sop_instance_uids) != self.voxels.shape[0]:
            raise ValueError("one SOP Instance UID per slice is required")
        frames = self.source_frames
        if frames is not None and sorted(frames) != list(range(1, self.voxels.shape[0] + 1)):
            raise ValueError("source_frames must give each slice its frame: a permutation of 1..slices")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (k, j, i) = (slice, row, column)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)  # columns: i, j, k
        return float(norms[2]), float(norms[1]), float(norms[0])

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def to_patient(self, ijk: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Voxel indices (..., 3) ordered (i, j, k) -> LPS mm (..., 3)."""
        pts = np.asarray(ijk, dtype=np.float64)
        return pts @ self.affine[:3, :3].T + self.affine[:3, 3]


@dataclass(frozen=True)
class Segment:
    """One segmented structure. ``mask`` has the shape of the source ``Volume.voxels``."""

    name: str
    category: Code
    type: Code
    mask: npt.NDArray[np.bool_]
    laterality: Code | None = None


@dataclass(frozen=True)
class Detection:
    """One detected finding (family ``detection``), e.g. a lung nodule candidate.

    Attributes:
        label: human-readable name, e.g. ``"Nodule 1"`` (unique within a result).
        type: what was found, e.g. ``Code("27925004", "SCT", "Nodule")``.
        centre_ijk: centre as fractional voxel indices (i, j, k) of the source ``Volume``.
        centre_lps: the same centre in patient LPS mm (``Volume.to_patient(centre_ijk)``).
        bbox_ijk_min, bbox_ijk_max: inclusive bounding box in voxel indices (i, j, k).
        diameter_mm: diameter of the sphere with the finding's volume (mm).
        confidence: in [0, 1]; how each model computes it is documented by the model (a ranking
            score unless the model says it is calibrated).
        tracking_id: stable identifier of the finding within the result (e.g. for TID 1500
            Tracking Identifier); deterministic for the same input.
    """

    label: str
    type: Code
    centre_ijk: tuple[float, float, float]
    centre_lps: tuple[float, float, float]
    bbox_ijk_min: tuple[int, int, int]
    bbox_ijk_max: tuple[int, int, int]
    diameter_mm: float
    confidence: float
    tracking_id: str

    def __post_init__(self) -> None:
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence must be in [0, 1], got {self.confidence}")
        if any(lo > hi for lo, hi in zip(self.bbox_ijk_min, self.bbox_ijk_max, strict=True)):
            raise ValueError("bbox_ijk_min must not exceed bbox_ijk_max")


@dataclass(frozen=True)
class Measured:
    """A coded measurement behind a classification, e.g. a width in mm, optionally drawn as a line.

    Attributes:
        name: human-readable, e.g. ``"Heart width"``.
        concept: what is measured, e.g. ``Code("103355008", "SCT", "Width")``.
        value: in ``unit`` (UCUM, e.g. ``"mm"``).
        site: where, e.g. ``Code("80891009", "SCT", "Heart")`` (None: unspecified).
        line_ijk: the measured distance as two points (i, j, k) of the source volume, drawn on key images.
    """

    name: str
    concept: Code
    value: float
    unit: str
    site: Code | None = None
    line_ijk: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None


@dataclass(frozen=True)
class Classification:
    """One series-level category (family ``classification``), e.g. emphysema severity.

    Attributes:
        name: human-readable name of the assessment, e.g. ``"Emphysema"``.
        concept: what is evaluated, e.g. ``Code("87433001", "SCT", "Pulmonary emphysema")``.
        value: the category found, e.g. ``Code("255604002", "SCT", "Mild")``.
        score: the figure the category was derived from (e.g. LAA% = 12.3).
        score_unit: UCUM unit of ``score`` (``"%"``, ``"1"`` for a plain number...).
        details: further figures by name (e.g. ``{"LAA% right lung": 10.1}``); units are part
            of the name or documented by the model.
    """

    name: str
    concept: Code
    value: Code
    score: float
    score_unit: str
    details: dict[str, float] = field(default_factory=dict)
    measurements: tuple[Measured, ...] = ()
    """Figures the category rests on, reported in the SR group (e.g. heart and thoracic widths)."""
    evaluations: tuple[tuple[Code, Code], ...] = ()
    """Further coded (concept, value) pairs for the SR group, e.g. (Image View, postero-anterior)."""


@dataclass(frozen=True)
class Registration:
    """A spatial registration of a PRIOR study onto the CURRENT one (family ``registration``).

    Attributes:
        transform: 4x4 float64 affine mapping a point in CURRENT-study LPS mm to the corresponding
            point in PRIOR-study LPS mm (homogeneous column vectors: ``p_prior = T @ p_current``).
            This is the direction in which the prior is resampled onto the current grid.
        residual_mm: quality figure defined by the model (for ``ct-registration``: RMS distance,
            in mm, from the current study's tissue/air boundary to the resampled prior's one).
        metric_value: final value of the optimised image similarity metric (model-defined; for
            Mattes mutual information lower, i.e. more negative, is better).
        resampled: float32 array shaped like the current ``Volume.voxels`` (k, j, i): the prior
            resampled onto the current grid (outside the prior's field of view: a fill value).
        prior_frame_of_reference_uid: the prior series' Frame of Reference UID (the transform's
            target frame).
    """

    transform: npt.NDArray[np.float64]
    residual_mm: float
    metric_value: float
    resampled: npt.NDArray[np.float32]
    prior_frame_of_reference_uid: str

    def __post_init__(self) -> None:
        if self.transform.shape != (4, 4):
            raise ValueError("transform must be 4x4")

    def map_to_prior(self, lps: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Current-study LPS points (..., 3) -> prior-study LPS points (..., 3)."""
        pts = np.asarray(lps, dtype=np.float64)
        return pts @ self.transform[:3, :3].T + self.transform[:3, 3]


@dataclass(frozen=True)
class Figure:
    """A figure about a model's run on a series, not a finding (e.g. its measured sensitivity there).

    Attributes:
        concept: what it is, e.g. ``Code("111089", "DCM", "Lesion Sensitivity")``.
        value: in ``unit`` (UCUM, e.g. ``"%"``).
        note: how it was obtained, in words (reported with it).
    """

    concept: Code
    value: float
    unit: str
    note: str = ""


@dataclass(frozen=True)
class ModelResult:
    """Everything one model produced for one series. Families fill the fields they own.

    ``segments``: segmentation; ``detections``: detection; ``classifications``: classification;
    ``registration``: registration (the result then belongs to the CURRENT series).
    """

    model_name: str
    model_version: str
    segments: tuple[Segment, ...] = ()
    notes: tuple[str, ...] = field(default=())
    detections: tuple[Detection, ...] = ()
    classifications: tuple[Classification, ...] = ()
    registration: Registration | None = None
    looked_for: tuple[Code, ...] = ()
    """What the model looked for (default: its manifest's ``looks_for``); a concept with no finding is
    reported as absent, or as not assessed with ``not_assessed``."""
    not_assessed: str | None = None
    """Set when the model declined the series (the reason): nothing was assessed (job ``skipped``)."""
    figures: tuple[Figure, ...] = ()
    """Figures about this run rather than findings, e.g. the measured sensitivity at this slice thickness."""


@dataclass(frozen=True)
class OutputLabel:
    """A label a model can emit, as declared in its manifest."""

    name: str
    category: Code
    type: Code


@dataclass(frozen=True)
class Manifest:
    """What a model is and accepts; loaded from ``models/<name>/manifest.yaml``."""

    name: str
    version: str
    family: Family
    description: str
    modalities: tuple[str, ...]
    min_slices: int
    outputs: tuple[OutputLabel, ...]
    objects: tuple[OutputObject, ...]
    looks_for: tuple[Code, ...] = ()
    """What a run reports as found, absent or not assessed; empty: the outputs' types."""

    @property
    def looked_for(self) -> tuple[Code, ...]:
        """``looks_for``, or the distinct types of the outputs when it is empty."""
        if self.looks_for:
            return self.looks_for
        return tuple(dict.fromkeys(o.type for o in self.outputs))


class Model(Protocol):
    """A model instance. Built once per worker process and reused for many series."""

    manifest: Manifest

    def check(self, volume: Volume) -> None:
        """Raise :class:`UnsuitableInput` with a reason if ``volume`` cannot be processed."""

    def run(self, volume: Volume) -> ModelResult:
        """Analyse ``volume``; must not keep per-study state between calls."""


class PairModel(Protocol):
    """A model that needs two series of one patient: family ``registration`` models implement it.

    ``run_pair`` registers ``prior`` onto ``current`` and returns a result for the CURRENT series
    whose ``registration`` is set. Registered pair models also provide ``run(volume)`` (so they
    fit :class:`Model` and the registry); it raises :class:`UnsuitableInput` because one series
    is not enough. Use :func:`is_pair_model` to tell them apart.
    """

    manifest: Manifest

    def check(self, volume: Volume) -> None:
        """Raise :class:`UnsuitableInput` with a reason if ``volume`` cannot be either series."""

    def run_pair(self, current: Volume, prior: Volume) -> ModelResult:
        """Register ``prior`` onto ``current``; must not keep per-study state between calls."""


def is_pair_model(model: object) -> TypeGuard[PairModel]:
    """True if ``model`` is a registration model with ``run_pair`` (see :class:`PairModel`)."""
    manifest = getattr(model, "manifest", None)
    return getattr(manifest, "family", None) == "registration" and callable(getattr(model, "run_pair", None))


def is_axial(volume: Volume, tolerance_deg: float = 10.0) -> bool:
    """True if the slice normal (k axis) is within ``tolerance_deg`` of the patient z axis.

    The in-plane axes may point anywhere (flipped or rotated in-plane images are axial).
    """
    k_axis = volume.affine[:3, 2]
    norm = float(np.linalg.norm(k_axis))
    if norm == 0.0 or not np.isfinite(norm):
        return False
    return abs(float(k_axis[2])) / norm >= float(np.cos(np.deg2rad(tolerance_deg)))


def tilt_degrees(volume: Volume) -> float:
    """Angle between the slice step and the image normal: 0 for stacked slices, the gantry tilt
    (or another shear) otherwise."""
    a = volume.affine[:3, :3]
    normal = np.cross(a[:, 0], a[:, 1])
    step = a[:, 2]
    denom = float(np.linalg.norm(normal) * np.linalg.norm(step))
    if denom == 0.0:
        return 90.0
    return float(np.degrees(np.arccos(min(1.0, abs(float(normal @ step)) / denom))))


MAX_TILT_DEGREES = 1.0
"""Sheared stacks (gantry tilt) beyond this are refused by :func:`check_input`."""


def check_input(manifest: Manifest, volume: Volume, *, max_slice_mm: float | None = None, axial: bool = False) -> None:
    """The common checks of :meth:`Model.check`; raise :class:`UnsuitableInput` with the reason.

    Modality and slice count from ``manifest``; a finite, non-degenerate affine; optionally a
    slice spacing of at most ``max_slice_mm`` and axial slices (:func:`is_axial`).
    """
    m = manifest
    if volume.modality not in m.modalities:
        raise UnsuitableInput(f"{m.name} needs modality {'/'.join(m.modalities)}, got {volume.modality!r}")
    n = volume.voxels.shape[0]
    if n < m.min_slices:
        raise UnsuitableInput(f"{m.name} needs at least {m.min_slices} slices, got {n}")
    if not np.isfinite(volume.affine).all() or abs(np.linalg.det(volume.affine[:3, :3])) < 1e-9:
        raise UnsuitableInput(f"{m.name}: degenerate voxel geometry (affine)")
    if (tilt := tilt_degrees(volume)) > MAX_TILT_DEGREES:
        raise UnsuitableInput(f"{m.name}: gantry tilt or sheared slices ({tilt:.1f} degrees)")
    if max_slice_mm is not None and volume.spacing[0] > max_slice_mm:
        raise UnsuitableInput(f"{m.name} needs slices at most {max_slice_mm:g} mm apart, got {volume.spacing[0]:g} mm")
    if axial and not is_axial(volume):
        raise UnsuitableInput(f"{m.name} needs axial slices")
