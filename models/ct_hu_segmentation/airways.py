"""Trachea and main bronchi inside the lung masks, tracked slice by slice from the head down.

The seed is a compact air region (below ``AirwayParams.air_hu``) near the midline between the lungs
in the most superior slices; in each next slice the air regions overlapping the previous slice's
airway (dilated in-plane by ``follow_mm``) are accepted unless they are larger than
``max_branch_ratio`` times the trachea's section or than ``max_growth`` times their share of the
sections they continue. Leaks into emphysematous parenchyma are refused, at the price of also
stopping at strongly oblique bronchi: the trachea and carina are found reliably, the main bronchi in
part. Used by ct-hu-segmentation (its Airway segment), ct-emphysema and ct-lung-nodules (which
remove the airways from the lungs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from models.base import Volume
from models.ct_hu_segmentation.bone import bbox
from models.ct_hu_segmentation.inplane import diamond, dilate

BoolArray = npt.NDArray[np.bool_]


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


def find_airways(
    hu: npt.NDArray[np.float32], right: BoolArray, left: BoolArray, volume: Volume, p: AirwayParams | None = None
) -> tuple[BoolArray, str]:
    """Trachea and bronchi inside the lung masks (see the module docstring) and a note."""
    p = p or AirwayParams()
    lungs_all = right | left
    out = np.zeros(hu.shape, dtype=bool)
    box = bbox(lungs_all, pad=1)
    if box is None or not right.any() or not left.any():
        return out, "airways: not searched (needs both lungs)"
    # Work in the lungs' in-plane box (all slices): nothing outside it can be airway.
    plane = (slice(None), box[1], box[2])
    origin = (0, box[1].start, box[2].start)
    lungs = lungs_all[plane]
    found = np.zeros(lungs.shape, dtype=bool)
    ks = np.flatnonzero(lungs.any(axis=(1, 2)))
    sk, sj, si = volume.spacing
    pixel_mm2 = sj * si
    # Superior first: LPS +z is the head.
    order = ks[::-1] if volume.affine[2, 2] > 0 else ks
    x_mid = 0.5 * (_centroid_x(right[plane], volume, origin) + _centroid_x(left[plane], volume, origin))
    eight = np.ones((3, 3), dtype=bool)
    follow = diamond(max(1, round(p.follow_mm / min(sj, si))))
    prev: BoolArray | None = None
    cap_mm2 = p.max_area_mm2
    for n_done, k in enumerate(order):
        air = (hu[k][plane[1:]] < p.air_hu) & lungs[k]
        lab, _ = ndi.label(air, structure=eight)
        if prev is None:
            if n_done * sk > p.seed_depth_mm:
                return out, "airways: no trachea found near the top of the lungs (nothing excluded)"
            seed = _trachea(lab, volume, int(k), origin, x_mid, p)
            if seed is None:
                continue
            accepted = lab == seed
            cap_mm2 = min(p.max_area_mm2, p.max_branch_ratio * float(accepted.sum()) * pixel_mm2)
        else:
            accepted = _follow(lab, prev, follow, pixel_mm2, cap_mm2, p)
            if not accepted.any():
                break
        found[k] = accepted
        prev = accepted
    if prev is None:
        return out, "airways: no trachea found near the top of the lungs (nothing excluded)"
    out[plane] = dilate(found, diamond(1)) & lungs
    return out, f"airways: {out.sum() * volume.voxel_volume_ml:.1f} ml excluded"


def _centroid_x(mask: BoolArray, volume: Volume, origin: tuple[int, int, int]) -> float:
    """LPS x of the centroid of ``mask`` (a box of the volume at index ``origin``, k, j, i), from its
    projections: cheap on large volumes."""
    kji = []
    for axis in range(3):
        counts = mask.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64)
        kji.append(float((counts * np.arange(origin[axis], origin[axis] + counts.size)).sum() / counts.sum()))
    return float(volume.to_patient([kji[2], kji[1], kji[0]])[0])


def _trachea(
    lab: npt.NDArray[np.int32], volume: Volume, k: int, origin: tuple[int, int, int], x_mid: float, p: AirwayParams
) -> int | None:
    """Label of the trachea candidate in slice ``k`` (compact, near the midline), or None; ``lab``
    is a box of the slice at row and column ``origin[1:]``."""
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
        x = float(volume.to_patient([ci + box[1].start + origin[2], cj + box[0].start + origin[1], k])[0])
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
    near = dilate(prev, follow)
    ids = np.unique(lab[near])
    ids = ids[ids > 0]
    if ids.size == 0:
        return np.zeros(lab.shape, dtype=bool)
    prev_lab, n_prev = ndi.label(prev, structure=np.ones((3, 3), dtype=bool))
    prev_area = np.bincount(prev_lab.ravel(), minlength=n_prev + 1).astype(np.float64) * pixel_mm2
    areas = np.bincount(lab.ravel()).astype(np.float64) * pixel_mm2
    boxes = ndi.find_objects(lab)
    reach = follow.shape[0] // 2
    parents_of: dict[int, npt.NDArray[np.intp]] = {}
    children = np.zeros(n_prev + 1, dtype=np.int64)
    for index in ids:
        # the region and its dilation by ``follow`` lie in its box grown by the reach of ``follow``
        sl = tuple(slice(max(0, b.start - reach), b.stop + reach) for b in boxes[index - 1])
        touching = np.unique(prev_lab[sl][dilate(lab[sl] == index, follow) & prev[sl]])
        parents_of[int(index)] = touching[touching > 0]
        children[parents_of[int(index)]] += 1
    keep = []
    for index, parents in parents_of.items():
        share = float((prev_area[parents] / np.maximum(children[parents], 1)).sum())
        if areas[index] <= cap_mm2 and areas[index] <= p.max_growth * share + 2.0 * pixel_mm2:
            keep.append(index)
    return np.isin(lab, keep)
