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
from scipy import ndimage as ndi

from models.base import (
    Classification,
    Code,
    Manifest,
    ModelResult,
    UnsuitableInput,
    Volume,
    check_input,
)
from models.ct_hu_segmentation.model import HuSegParams, segment_ct
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
class AirwayParams:
    """Trachea and bronchus tracking (HU, mm, mm^2); see :func:`find_airways`."""

    air_hu: float = -950.0
    seed_depth_mm: float = 40.0  # how far below the top of the lungs to look for the trachea
    seed_offset_mm: float = 20.0  # max distance of the trachea from the midline between the lungs
    seed_area_mm2: tuple[float, float] = (30.0, 600.0)
    max_area_mm2: float = 600.0
    max_branch_ratio: float = 2.5  # max area of any airway section / the trachea's at the seed
    max_growth: float = 1.5  # max area ratio of a section to its parent in the slice above (+ 2 pixels)
    follow_mm: float = 2.0


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
            raise ValueError(f"{manifest_path}: outputs must be ['Emphysema'], got {names}")
        self._label = self.manifest.outputs[0]

    def check(self, volume: Volume) -> None:
        """Raise :class:`UnsuitableInput` unless ``volume`` is an axial CT with enough, close slices."""
        check_input(self.manifest, volume, max_slice_mm=self.params.max_slice_mm, axial=True)

    def run(self, volume: Volume) -> ModelResult:
        """LAA% and grade; :class:`UnsuitableInput` if the series has too little lung."""
        self.check(volume)
        p = self.params
        masks, notes = segment_ct(volume, p.segmentation)
        right, left = masks["Right Lung"], masks["Left Lung"]
        airways, airway_note = find_airways(volume.voxels, right, left, volume, p.airways)
        notes.append(airway_note)
        vml = volume.voxel_volume_ml
        right &= ~airways
        left &= ~airways
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


def find_airways(
    hu: npt.NDArray[np.float32], right: BoolArray, left: BoolArray, volume: Volume, p: AirwayParams | None = None
) -> tuple[BoolArray, str]:
    """Trachea and bronchi inside the lung masks (see the module docstring) and a note."""
    p = p or AirwayParams()
    lungs = right | left
    out = np.zeros(hu.shape, dtype=bool)
    ks = np.flatnonzero(lungs.any(axis=(1, 2)))
    if ks.size == 0 or not right.any() or not left.any():
        return out, "airways: not searched (needs both lungs)"
    sk, sj, si = volume.spacing
    pixel_mm2 = sj * si
    # Superior first: LPS +z is the head.
    order = ks[::-1] if volume.affine[2, 2] > 0 else ks
    x_mid = 0.5 * (_centroid_x(right, volume) + _centroid_x(left, volume))
    eight = np.ones((3, 3), dtype=bool)
    follow = ndi.iterate_structure(ndi.generate_binary_structure(2, 1), max(1, round(p.follow_mm / min(sj, si))))
    prev: BoolArray | None = None
    cap_mm2 = p.max_area_mm2
    for n_done, k in enumerate(order):
        air = (hu[k] < p.air_hu) & lungs[k]
        lab, _ = ndi.label(air, structure=eight)
        if prev is None:
            if n_done * sk > p.seed_depth_mm:
                return out, "airways: no trachea found near the top of the lungs (nothing excluded)"
            seed = _trachea(lab, volume, int(k), x_mid, p)
            if seed is None:
                continue
            accepted = lab == seed
            cap_mm2 = min(p.max_area_mm2, p.max_branch_ratio * float(accepted.sum()) * pixel_mm2)
        else:
            accepted = _follow(lab, prev, follow, pixel_mm2, cap_mm2, p)
            if not accepted.any():
                break
        out[k] = accepted
        prev = accepted
    if prev is None:
        return out, "airways: no trachea found near the top of the lungs (nothing excluded)"
    out = ndi.binary_dilation(out, structure=np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], dtype=bool)) & lungs
    return out, f"airways: {out.sum() * volume.voxel_volume_ml:.1f} ml excluded"


def _centroid_x(mask: BoolArray, volume: Volume) -> float:
    """LPS x of the centroid of ``mask`` (from its projections: cheap on large volumes)."""
    kji = []
    for axis in range(3):
        counts = mask.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64)
        kji.append(float((counts * np.arange(counts.size)).sum() / counts.sum()))
    return float(volume.to_patient([kji[2], kji[1], kji[0]])[0])


def _trachea(lab: npt.NDArray[np.int32], volume: Volume, k: int, x_mid: float, p: AirwayParams) -> int | None:
    """Label of the trachea candidate in one slice (compact, near the midline), or None."""
    _, sj, si = volume.spacing
    lo, hi = p.seed_area_mm2
    best: tuple[float, int] | None = None
    for index, box in enumerate(ndi.find_objects(lab), start=1):
        if box is None:
            continue
        comp = lab[box] == index
        area = float(comp.sum()) * sj * si
        extent = max((box[0].stop - box[0].start) * sj, (box[1].stop - box[1].start) * si)
        if not lo <= area <= hi or extent > 2.0 * np.sqrt(hi / np.pi):
            continue
        cj, ci = ndi.center_of_mass(comp)
        x = float(volume.to_patient([ci + box[1].start, cj + box[0].start, k])[0])
        offset = abs(x - x_mid)
        if offset <= p.seed_offset_mm and (best is None or offset < best[0]):
            best = (offset, index)
    return None if best is None else best[1]


def _follow(
    lab: npt.NDArray[np.int32], prev: BoolArray, follow: BoolArray, pixel_mm2: float, cap_mm2: float, p: AirwayParams
) -> BoolArray:
    """Air regions of this slice that continue the previous slice's airways without leaking.

    A region may be at most ``max_growth`` times its share of the sections it continues (a
    section continued by n regions shares its area n ways) plus two pixels, and at most ``cap_mm2``.
    """
    near = ndi.binary_dilation(prev, structure=follow)
    ids = np.unique(lab[near])
    ids = ids[ids > 0]
    accepted = np.zeros(lab.shape, dtype=bool)
    if ids.size == 0:
        return accepted
    prev_lab, n_prev = ndi.label(prev, structure=np.ones((3, 3), dtype=bool))
    prev_area = np.bincount(prev_lab.ravel(), minlength=n_prev + 1).astype(np.float64) * pixel_mm2
    areas = np.bincount(lab.ravel()).astype(np.float64) * pixel_mm2
    parents_of: dict[int, npt.NDArray[np.intp]] = {}
    children = np.zeros(n_prev + 1, dtype=np.int64)
    for index in ids:
        touching = np.unique(prev_lab[ndi.binary_dilation(lab == index, structure=follow) & prev])
        parents_of[int(index)] = touching[touching > 0]
        children[parents_of[int(index)]] += 1
    for index, parents in parents_of.items():
        share = float((prev_area[parents] / np.maximum(children[parents], 1)).sum())
        if areas[index] <= cap_mm2 and areas[index] <= p.max_growth * share + 2.0 * pixel_mm2:
            accepted |= lab == index
    return accepted
