"""Bone of ``ct-hu-segmentation``: cortical bone plus the cancellous bone (marrow) it encloses.

Cortex is easy (``HU > bone_hu``); marrow is not: red marrow is 100-300 HU, like contrast-filled
blood, and fatty marrow is fat. A marrow voxel is therefore recognised by where it lies, not
only by its density. Steps (in-plane unless said otherwise; thresholds in :class:`BoneParams`):

1. ``dense``: ``HU > bone_hu`` inside the body.
2. Enclosed marrow: voxels whose 3x3 neighbourhood is marrow-dense (3x3 mean at least
   ``marrow_hu`` on each of its 3x3 neighbours, so no canal rim) and that have dense bone
   within ``marrow_reach_mm`` in all four in-plane axis directions (inside a vertebral body or
   a rib, not beside one). This reaches marrow whose shell is open in this slice (the
   basivertebral foramen joins a vertebral body to the spinal canal). An in-plane opening of
   ``marrow_opening_mm`` drops thin slivers (blood between the calcified arcs of an aorta).
3. ``dense | marrow`` is closed with an octagon (a digital disk) of radius ``close_mm``.
4. In-plane holes of that mask are filled when they are small (``small_hole_cm2``, any
   density: islands of marrow, rib interiors), marrow-dense (median at least ``marrow_hu``, up
   to ``max_hole_cm2``), or fatty and small (median at most ``fat_marrow_hu``, up to
   ``fat_hole_cm2``: the medullary cavity of an arm or leg bone). Larger holes of water to
   soft-tissue density stay open: the spinal canal (CSF and cord, about 0-40 HU, 1.5-4 cm2 in
   adults; a canal under ``small_hole_cm2`` would be filled) and an intervertebral disc seen
   inside its endplate ring (about 70-90 HU).
5. 3-D: a marrow-dense voxel with bone in the slices above and below is bone.
6. 3-D components under ``min_component_ml`` are dropped.

Not bone but possibly included, as before: calcified vessel walls and costal cartilage where
denser than ``bone_hu``, and the lumen of a vessel whose calcified wall closes a ring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from models.ct_hu_segmentation.inplane import run_filter, thread_map

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float32]

_CHUNK = 32  # slices per in-plane pass (bounds the temporary arrays)
_FAR = np.int16(16000)  # "no dense voxel" (images up to 16000 pixels wide)


@dataclass(frozen=True)
class BoneParams:
    """Thresholds of the bone step (HU, mm, cm2, ml)."""

    bone_hu: float = 200.0
    marrow_hu: float = 100.0
    marrow_reach_mm: float = 30.0
    close_mm: float = 2.0
    marrow_opening_mm: float = 2.0
    small_hole_cm2: float = 0.6
    max_hole_cm2: float = 20.0
    fat_marrow_hu: float = -20.0
    fat_hole_cm2: float = 3.0
    min_component_ml: float = 0.3


def segment_bone(hu: FloatArray, body: BoolArray, spacing: tuple[float, float, float], p: BoneParams) -> BoolArray:
    """Bone mask (cortex and enclosed marrow) of ``hu`` (k, j, i) inside ``body``; see the module docstring."""
    out = np.zeros(hu.shape, dtype=bool)
    box = bbox(body, pad=1)
    if box is None:
        return out
    sub_hu, sub_body = hu[box], body[box]
    bone = np.empty(sub_body.shape, dtype=bool)
    marrowish = np.empty(sub_body.shape, dtype=bool)

    def chunk(k0: int) -> None:  # steps 1-4 are in-plane: chunks of slices are independent
        ks = slice(k0, k0 + _CHUNK)
        bone[ks], marrowish[ks] = _inplane(sub_hu[ks], sub_body[ks], spacing, p)

    thread_map(chunk, range(0, sub_body.shape[0], _CHUNK))
    between = np.zeros_like(bone)
    between[1:-1] = bone[2:] & bone[:-2]
    bone |= between & marrowish & sub_body
    lab, n = ndi.label(bone)
    if n:
        counts = np.bincount(lab.ravel(), minlength=n + 1)
        keep = counts * float(np.prod(spacing)) / 1000.0 >= p.min_component_ml
        keep[0] = False
        bone = keep[lab]
    out[box] = bone
    return out


def bbox(mask: BoolArray, pad: int) -> tuple[slice, slice, slice] | None:
    """Bounding box of ``mask`` grown in-plane by ``pad`` (clipped to the array); None if empty."""
    ks = np.flatnonzero(mask.any(axis=(1, 2)))
    if ks.size == 0:
        return None
    js = np.flatnonzero(mask.any(axis=(0, 2)))
    is_ = np.flatnonzero(mask.any(axis=(0, 1)))
    _, rows, cols = mask.shape
    return (
        slice(int(ks[0]), int(ks[-1]) + 1),
        slice(max(0, int(js[0]) - pad), min(rows, int(js[-1]) + 1 + pad)),
        slice(max(0, int(is_[0]) - pad), min(cols, int(is_[-1]) + 1 + pad)),
    )


def _inplane(
    hu: FloatArray, body: BoolArray, spacing: tuple[float, float, float], p: BoneParams
) -> tuple[BoolArray, BoolArray]:
    """Steps 1-4 on a stack of slices: (bone, marrow-dense) masks."""
    _, sj, si = spacing
    dense = (hu > p.bone_hu) & body
    # 3x3 mean against noise, then 3x3 minimum: a voxel beside cortex is not marrow-dense just
    # because the cortex raises its mean (the rim of the spinal canal).
    mean = ndi.uniform_filter(hu, size=(1, 3, 3))
    lowest = run_filter(run_filter(mean, 3, 1, np.minimum, np.inf), 3, 2, np.minimum, np.inf)
    marrowish = lowest >= p.marrow_hu
    reach = (max(1, round(p.marrow_reach_mm / sj)), max(1, round(p.marrow_reach_mm / si)))
    marrow = marrowish & body & enclosed(dense, reach)
    if p.marrow_opening_mm > 0:
        radius = _radius_px(p.marrow_opening_mm, sj, si)
        marrow = _dilate(_erode(marrow, radius), radius) & marrow
    bone = dense | marrow
    radius = _radius_px(p.close_mm, sj, si)
    bone = _erode(_dilate(bone, radius), radius) & body
    return bone | _holes_to_fill(bone, hu, sj * si / 100.0, p), marrowish


def enclosed(dense: BoolArray, reach: tuple[int, int]) -> BoolArray:
    """True where ``dense`` lies within ``reach`` (rows, cols) pixels on all four in-plane sides."""
    ok = np.ones(dense.shape, dtype=bool)
    for axis, limit in ((1, reach[0]), (2, reach[1])):
        n = dense.shape[axis]
        idx = np.arange(n, dtype=np.int16).reshape((1, n, 1) if axis == 1 else (1, 1, n))
        before = np.where(dense, idx, -_FAR)
        np.maximum.accumulate(before, axis=axis, out=before)
        ok &= (idx - before) <= limit
        after = np.flip(np.where(dense, idx, _FAR), axis=axis)
        np.minimum.accumulate(after, axis=axis, out=after)
        ok &= (np.flip(after, axis=axis) - idx) <= limit
    return ok


def _radius_px(radius_mm: float, step_j: float, step_i: float) -> int:
    return max(1, round(radius_mm / min(step_j, step_i)))


def _dilate(mask: BoolArray, radius: int) -> BoolArray:
    """In-plane binary dilation by an octagon of ``radius`` pixels (3x3 squares and crosses, alternating).

    Separable 3-pixel windows: fast whatever the radius, unlike a disk structuring element.
    """
    out = mask
    for step in range(radius):
        along_j = run_filter(out, 3, 1, np.logical_or, False)
        if step % 2 == 0:  # 3x3 square
            out = run_filter(along_j, 3, 2, np.logical_or, False)
        else:  # 3x3 cross
            out = along_j | run_filter(out, 3, 2, np.logical_or, False)
    return out


def _erode(mask: BoolArray, radius: int) -> BoolArray:
    """In-plane binary erosion by the octagon of :func:`_dilate`; outside the array counts as set."""
    out = mask
    for step in range(radius):
        along_j = run_filter(out, 3, 1, np.logical_and, True)
        if step % 2 == 0:
            out = run_filter(along_j, 3, 2, np.logical_and, True)
        else:
            out = along_j & run_filter(out, 3, 2, np.logical_and, True)
    return out


def _holes_to_fill(bone: BoolArray, hu: FloatArray, pixel_cm2: float, p: BoneParams) -> BoolArray:
    """In-plane holes of ``bone`` that are marrow by size and density (step 4)."""
    cross = np.zeros((3, 3, 3), dtype=bool)
    cross[1] = ndi.generate_binary_structure(2, 1)
    lab, n = ndi.label(~bone, structure=cross)
    if n == 0:
        return np.zeros(bone.shape, dtype=bool)
    outer = np.zeros(n + 1, dtype=bool)
    for edge in (lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]):
        outer[np.unique(edge)] = True
    outer[0] = True
    inside = ~outer[lab]
    if not inside.any():
        return inside
    labels = lab[inside]
    area = np.bincount(labels, minlength=n + 1) * pixel_cm2
    index = np.flatnonzero(~outer)
    median = np.zeros(n + 1, dtype=np.float64)
    median[index] = ndi.median(hu[inside], labels, index=index)
    fill = (area <= p.small_hole_cm2) | ((area <= p.max_hole_cm2) & (median >= p.marrow_hu))
    fill |= (area <= p.fat_hole_cm2) & (median <= p.fat_marrow_hu)
    fill &= ~outer
    return fill[lab]
