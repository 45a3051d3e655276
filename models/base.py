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
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

Family = Literal["segmentation", "detection", "classification", "registration"]
OutputObject = Literal["SEG", "SR", "SC"]


class ModelError(Exception):
    """A model could not produce a result for this input (recorded on the job, not retried)."""


class UnsuitableInput(ModelError):
    """The series is not something this model accepts (wrong modality, too few slices, ...)."""


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
    """

    voxels: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    modality: str
    sop_instance_uids: tuple[str, ...]
    frame_of_reference_uid: str

    def __post_init__(self) -> None:
        if self.voxels.ndim != 3:
            raise ValueError(f"voxels must be 3-D, got shape {self.voxels.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError("affine must be 4x4")
        if len(self.sop_instance_uids) != self.voxels.shape[0]:
            raise ValueError("one SOP Instance UID per slice is required")

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
class ModelResult:
    """Everything one model produced for one series. Families fill the fields they own."""

    model_name: str
    model_version: str
    segments: tuple[Segment, ...] = ()
    notes: tuple[str, ...] = field(default=())


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


class Model(Protocol):
    """A model instance. Built once per worker process and reused for many series."""

    manifest: Manifest

    def check(self, volume: Volume) -> None:
        """Raise :class:`UnsuitableInput` with a reason if ``volume`` cannot be processed."""

    def run(self, volume: Volume) -> ModelResult:
        """Analyse ``volume``; must not keep per-study state between calls."""
