"""Classical emphysema quantification on CT: LAA-950 (low-attenuation area) and a severity grade.

No trained weights. Outline of :meth:`CtEmphysema.run` (thresholds in :class:`EmphysemaParams`):

Lungs
    Right and left lung from :func:`models.ct_hu_segmentation.model.segment_ct` (air-density
    regions inside the body, trachea and bronchi included). Fewer than ``min_lung_ml`` of lung
    (an abdominal CT with a sliver of lung base, a head CT) is :class:`UnsuitableInput`.
Airways
    Trachea and the bronchi it leads to are tracked slice by slice from the head down: the seed
    is a compact air region (below ``AirwayParams.air_hu``) near the midline between the lungs in
    the most superior slices; in each next slice the air regions overlapping the previous slice's
    airway (dilated in-plane by ``follow_mm``) are accepted unless they are larger than
    ``max_branch_ratio`` times the trachea's section or than ``max_growth`` times their share of
    the sections they continue. A branch stops there: leaks into emphysematous parenchyma are
    refused, at the price of also stopping at strongly oblique bronchi, so the trachea and carina
    are removed reliably and the main bronchi only in part (on the phantoms about 5 of 9 ml of
    airway, a bias of under one LAA point). The tracked airways, dilated by one pixel in-plane,
    are removed from the lungs. When no trachea is found (scan starting below the carina) nothing
    is removed.
LAA%
    ``100 * (voxels below laa_hu) / (lung voxels)``, both lungs together and per lung. The -950 HU
    threshold is the one validated against pathology by Gevenois et al. (Am J Respir Crit Care
    Med 1995;152:653-657 and 1996;154:187-192) for 1-mm sections.
Grade
    ``cutoffs`` (5, 15, 25 %): below 5 % is within the normal range (the usual upper limit of
    normal for LAA-950, e.g. COPDGene); 5-15 % mild, 15-25 % moderate and 25 % or more severe.
    These bands are a common quantitative convention, not a consensus standard; visual Fleischner
    grading (Lynch et al., Radiology 2015;277:192-205) is not reproduced. LAA% depends on dose,
    reconstruction kernel, slice thickness and inspiration: compare like with like.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.base import (
    Classification,
    Code,
    Manifest,
    ModelResult,
    UnsuitableInput,
    Volume,
    check_input,
)
from models.ct_hu_segmentation.airways import AirwayParams
from models.ct_hu_segmentation.airways import find_airways as find_airways  # re-exported by the package
from models.ct_hu_segmentation.model import HuSegParams, chest_masks
from models.errors import ManifestError
from models.manifest import MANIFEST_FILENAME, load_manifest

MANIFEST_PATH = Path(__file__).with_name(MANIFEST_FILENAME)

BoolArray = npt.NDArray[np.bool_]

GRADES: tuple[Code, ...] = (
    Code("272519000", "SCT", "Absent"),  # DICOM CID 240 "Present-Absent"
    Code("255604002", "SCT", "Mild"),
    Code("6736007", "SCT", "Moderate"),
    Code("24484000", "SCT", "Severe"),
)


@dataclass(frozen=True)
class EmphysemaParams:
    """Thresholds (HU, %, ml, mm) of the classical pipeline."""

    laa_hu: float = -950.0
    cutoffs: tuple[float, float, float] = (5.0, 15.0, 25.0)
    min_lung_ml: float = 200.0
    max_slice_mm: float = 5.0
    airways: AirwayParams = field(default_factory=AirwayParams)
    segmentation: HuSegParams = field(default_factory=HuSegParams)


def grade(laa_percent: float, cutoffs: tuple[float, float, float] = EmphysemaParams.cutoffs) -> Code:
    """The severity code for ``laa_percent`` (bands ``[0, c0)``, ``[c0, c1)``, ``[c1, c2)``, ``[c2, 100]``)."""
    return GRADES[int(np.searchsorted(np.asarray(cutoffs), laa_percent, side="right"))]


class CtEmphysema:
    """The ``ct-emphysema`` model (stateless between calls; safe to reuse)."""

    def __init__(self, params: EmphysemaParams | None = None, manifest_path: Path = MANIFEST_PATH) -> None:
        self.manifest: Manifest = load_manifest(manifest_path)
        self.params = params or EmphysemaParams()
        names = [o.name for o in self.manifest.outputs]
        if names != ["Emphysema"]:
            raise ManifestError(f"{manifest_path}: outputs must be ['Emphysema'], got {names}")
        self._label = self.manifest.outputs[0]

    def check(self, volume: Volume) -> None:
        """Raise :class:`UnsuitableInput` unless ``volume`` is an axial CT with enough, close slices."""
        check_input(self.manifest, volume, max_slice_mm=self.params.max_slice_mm, axial=True)

    def run(self, volume: Volume) -> ModelResult:
        """LAA% and grade; :class:`UnsuitableInput` if the series has too little lung."""
        self.check(volume)
        p = self.params
        chest = chest_masks(volume, p.segmentation, p.airways)
        notes = [*chest.notes, chest.airway_note]
        airways = chest.airways
        right = chest.right & ~airways
        left = chest.left & ~airways
        vml = volume.voxel_volume_ml
        lung_ml = float((right.sum() + left.sum()) * vml)
        if lung_ml < p.min_lung_ml:
            raise UnsuitableInput(
                f"{self.manifest.name}: only {lung_ml:.0f} ml of lung in the series "
                f"(needs at least {p.min_lung_ml:.0f} ml): not a chest CT"
            )
        low = volume.voxels < p.laa_hu
        n_right, n_left = int(right.sum()), int(left.sum())
        laa_right, laa_left = int((low & right).sum()), int((low & left).sum())
        total = 100.0 * (laa_right + laa_left) / (n_right + n_left)
        details = {
            "LAA% right lung": _percent(laa_right, n_right),
            "LAA% left lung": _percent(laa_left, n_left),
            "right lung volume (ml)": n_right * vml,
            "left lung volume (ml)": n_left * vml,
            "low-attenuation volume (ml)": (laa_right + laa_left) * vml,
            "airways excluded (ml)": float(airways.sum() * vml),
            "threshold (HU)": p.laa_hu,
        }
        value = grade(total, p.cutoffs)
        result = Classification(
            name=self._label.name,
            concept=self._label.type,
            value=value,
            score=total,
            score_unit="%",
            details=details,
        )
        notes.append(f"LAA-950 {total:.1f} % of {lung_ml:.0f} ml lung: {value.meaning}")
        return ModelResult(
            model_name=self.manifest.name,
            model_version=self.manifest.version,
            notes=tuple(notes),
            classifications=(result,),
        )


def _percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0
