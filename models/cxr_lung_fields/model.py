"""Classical lung fields and cardiothoracic ratio on a frontal chest radiograph (no trained weights).

The loader (:mod:`workers.load`) gives one image as a one-slice :class:`Volume`, dense = bright
(MONOCHROME1 inverted), modality rescale applied, no VOI LUT; its affine carries the pixel size at
the patient and which way the columns run (towards the patient's left on a PA film).

Outline of :meth:`CxrLungFields.run`:

Lung fields
    The image is averaged down to about ``work_mm`` pixels and scaled between its 1st and 99th
    percentiles. Pixels below the lower of two three-class Otsu thresholds of the smoothed image
    (air, soft tissue, bone; the two-class threshold if that finds no two lungs) are air: the components
    touching the image border (air around the patient) are dropped, and the two largest remaining
    ones, each at least ``min_lung_fraction`` of the image, are the lungs; each is closed, filled
    and opened (``close_mm``, ``open_mm``) and brought back to the source grid. The right lung is
    the one on the patient's right (from the affine, not from the screen side).
Widths
    Midline: the middle of the mediastinum (between the lungs' medial edges) over the upper
    third of the lung fields. Heart width = the largest distance of the right heart border (the
    right lung's medial edge) from the midline plus that of the left one, over the rows of the
    lower 60 % of the lung fields where both lungs are at least ``min_row_width`` of their widest
    row; going down, a border ends where the medial edge turns outwards along the diaphragm (the
    cardiophrenic angle, :func:`_border_peak`). Thoracic width = the largest distance between the lateral lung edges
    on one row (the inner rib margins). CTR = heart width / thoracic width.
Classification
    Cardiomegaly (SCT 8186001) present when CTR > ``ctr_cutoff`` (0.5, the conventional PA limit),
    else absent (SCT 272519000).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.base import (
    Classification,
    Code,
    Manifest,
    Measured,
    ModelResult,
    Segment,
    UnsuitableInput,
    Volume,
    check_input,
)
from models.errors import ManifestError
from models.manifest import MANIFEST_FILENAME, load_manifest_file
from models.mr_brain_segmentation.intensity import otsu, otsu3

MANIFEST_PATH = Path(__file__).with_name(MANIFEST_FILENAME)
BoolArray = npt.NDArray[np.bool_]

CARDIOMEGALY = Code("8186001", "SCT", "Cardiomegaly")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
WIDTH = Code("103355008", "SCT", "Width")
HEART = Code("80891009", "SCT", "Heart")
THORAX = Code("816094009", "SCT", "Thorax")


@dataclass(frozen=True)
class CxrParams:
    """Sizes (mm), fractions and the CTR cut-off."""

    work_mm: float = 1.0
    smooth_mm: float = 1.0
    close_mm: float = 6.0
    open_mm: float = 3.0
    min_lung_fraction: float = 0.02
    min_row_width: float = 0.3
    border_drop_mm: float = 3.0
    row_shrink: float = 0.6
    ctr_cutoff: float = 0.5
    min_side_mm: float = 150.0


@dataclass(frozen=True)
class ThoraxMeasures:
    """Widths in mm and where they were measured (column positions in source pixels, rows)."""

    heart_mm: float
    thoracic_mm: float
    midline_col: float
    right_border: tuple[int, float]  # (row, column) of the right heart border's farthest point
    left_border: tuple[int, float]
    thorax_row: int
    thorax_cols: tuple[float, float]

    @property
    def ctr(self) -> float:
        return self.heart_mm / self.thoracic_mm


def _block_mean(image: npt.NDArray[np.float32], f: int) -> npt.NDArray[np.float32]:
    rows, cols = (image.shape[0] // f) * f, (image.shape[1] // f) * f
    return image[:rows, :cols].reshape(rows // f, f, cols // f, f).mean(axis=(1, 3)).astype(np.float32)


def _disk(radius_px: float) -> BoolArray:
    r = max(1, round(radius_px))
    yy, xx = np.ogrid[-r:r + 1, -r:r + 1]
    return np.asarray(yy**2 + xx**2 <= r * r)


def find_lungs(image: npt.NDArray[np.float32], pixel_mm: float, p: CxrParams) -> tuple[BoolArray, BoolArray]:
    """(lung on the low-column side, lung on the high-column side) on the source grid."""
    f = max(1, round(p.work_mm / pixel_mm))
    small = _block_mean(image, f)
    mm = pixel_mm * f
    lo, hi = (float(v) for v in np.percentile(small, (1.0, 99.0)))
    norm = np.clip((small - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    smooth = ndimage.gaussian_filter(norm, p.smooth_mm / mm)
    for threshold in (otsu3(smooth)[0], otsu(smooth)):  # air | soft tissue | bone, else air | the rest
        air = smooth < threshold
        labels, n = ndimage.label(air)
        border = set(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]).tolist())
        index = np.array([i for i in range(1, n + 1) if i not in border], dtype=np.int64)
        sizes = ndimage.sum_labels(air, labels, index) if index.size else np.zeros(0)
        order = index[np.argsort(sizes)[::-1][:2]]
        if order.size == 2 and ndimage.sum_labels(air, labels, order).min() >= p.min_lung_fraction * air.size:
            break
    else:
        raise UnsuitableInput("cxr-lung-fields: two lung fields not found (not a frontal chest radiograph?)")
    masks = []
    for label in order:
        m = ndimage.binary_closing(labels == label, structure=_disk(p.close_mm / mm), border_value=0)
        m = ndimage.binary_fill_holes(m)
        m = ndimage.binary_opening(m, structure=_disk(p.open_mm / mm))
        big = np.zeros(image.shape, dtype=bool)
        up = np.repeat(np.repeat(m, f, axis=0), f, axis=1)
        big[: up.shape[0], : up.shape[1]] = up
        masks.append(big)
    cols = [float(np.nonzero(m)[1].mean()) for m in masks]
    low, high = (masks[0], masks[1]) if cols[0] < cols[1] else (masks[1], masks[0])
    return low, high


def _edges(mask: BoolArray) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """First and last column of each row (NaN where the row is empty)."""
    any_row = mask.any(axis=1)
    first = np.where(any_row, np.argmax(mask, axis=1), np.nan)
    last = np.where(any_row, mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1), np.nan)
    return first.astype(np.float64), last.astype(np.float64)


def _border_peak(distance: npt.NDArray[np.float64], width: npt.NDArray[np.float64], drop: float,
                 shrink: float) -> tuple[int, float]:
    """Index and value of the heart border's farthest point: going down, the first maximum after
    which the medial lung edge comes back towards the midline by ``drop``, or before the lung's
    row narrows to less than ``shrink`` of the row above (below it the medial edge follows the
    diaphragm: the cardiophrenic angle); the overall maximum if neither happens."""
    d = ndimage.uniform_filter1d(distance, 5, mode="nearest")
    best = 0
    for i in range(len(d)):
        if i and width[i] < shrink * width[i - 1]:
            break
        if d[i] > d[best]:
            best = i
        elif d[i] < d[best] - drop:
            break
    return best, float(distance[best])


def measure_thorax(low: BoolArray, high: BoolArray, col_mm: float, p: CxrParams) -> ThoraxMeasures:
    """Heart and thoracic widths from the two lung masks (``low``: the lung at lower column indices)."""
    l_first, l_last = _edges(low)  # low-column lung: lateral = first, medial = last
    h_first, h_last = _edges(high)  # high-column lung: medial = first, lateral = last
    rows = np.flatnonzero(low.any(axis=1) | high.any(axis=1))
    top, bottom = int(rows[0]), int(rows[-1])
    both = ~np.isnan(l_last) & ~np.isnan(h_first)
    upper = both & (np.arange(low.shape[0]) < top + (bottom - top) / 3.0)
    if not upper.any():
        raise UnsuitableInput("cxr-lung-fields: the lung apices are not side by side (not a frontal film?)")
    midline = float(np.median((l_last[upper] + h_first[upper]) / 2.0))
    l_width, h_width = l_last - l_first, h_last - h_first
    wide = both & (l_width >= p.min_row_width * np.nanmax(l_width)) & (h_width >= p.min_row_width * np.nanmax(h_width))
    lower = wide & (np.arange(low.shape[0]) >= top + 0.4 * (bottom - top))
    if not lower.any():
        raise UnsuitableInput("cxr-lung-fields: no heart borders between the lungs")
    lower_rows = np.flatnonzero(lower)
    drop = p.border_drop_mm / col_mm
    r_i, r_px = _border_peak(midline - l_last[lower_rows], l_width[lower_rows], drop, p.row_shrink)
    l_i, l_px = _border_peak(h_first[lower_rows] - midline, h_width[lower_rows], drop, p.row_shrink)
    r_row, l_row = int(lower_rows[r_i]), int(lower_rows[l_i])
    heart_px = max(0.0, r_px) + max(0.0, l_px) + 1.0
    span = np.where(~np.isnan(l_first) & ~np.isnan(h_last), h_last - l_first + 1.0, 0.0)
    t_row = int(np.argmax(span))
    return ThoraxMeasures(
        heart_mm=heart_px * col_mm,
        thoracic_mm=float(span[t_row]) * col_mm,
        midline_col=midline,
        right_border=(r_row, float(l_last[r_row])),
        left_border=(l_row, float(h_first[l_row])),
        thorax_row=t_row,
        thorax_cols=(float(l_first[t_row]), float(h_last[t_row])),
    )


class CxrLungFields:
    """The ``cxr-lung-fields`` model (stateless between calls; safe to reuse)."""

    def __init__(self, params: CxrParams | None = None, manifest_path: Path = MANIFEST_PATH) -> None:
        file = load_manifest_file(manifest_path)
        self.manifest: Manifest = file.to_manifest()
        self.params = params or CxrParams()
        names = [o.name for o in self.manifest.outputs]
        if names != ["Right Lung", "Left Lung"]:
            raise ManifestError(f"{manifest_path}: outputs must be ['Right Lung', 'Left Lung'], got {names}")
        self._laterality = {o.name: o.laterality.to_code() if o.laterality else None for o in file.outputs}

    def check(self, volume: Volume) -> None:
        """Raise :class:`UnsuitableInput` unless ``volume`` is one CR/DX image covering a chest."""
        check_input(self.manifest, volume)
        if volume.voxels.shape[0] != 1:
            raise UnsuitableInput(f"{self.manifest.name} needs one image, got {volume.voxels.shape[0]} frames")
        _, rows, cols = volume.voxels.shape
        _, row_mm, col_mm = volume.spacing
        if min(rows * row_mm, cols * col_mm) < self.params.min_side_mm:
            raise UnsuitableInput(f"{self.manifest.name}: the image covers {cols * col_mm:.0f} x {rows * row_mm:.0f} "
                                  f"mm, less than a chest")

    def run(self, volume: Volume) -> ModelResult:
        """Lung fields, widths, CTR and the Cardiomegaly classification."""
        self.check(volume)
        p = self.params
        _, row_mm, col_mm = volume.spacing
        image = np.asarray(volume.voxels[0], dtype=np.float32)
        low, high = find_lungs(image, float(np.sqrt(row_mm * col_mm)), p)
        towards_left = float(volume.affine[0, 0]) >= 0.0  # columns run towards the patient's left (+x)
        right, left = (low, high) if towards_left else (high, low)
        m = measure_thorax(low, high, col_mm, p)
        ctr = m.ctr
        value = PRESENT if ctr > p.ctr_cutoff else ABSENT
        r_row, r_col = m.right_border
        l_row, l_col = m.left_border
        measured = (
            Measured("Heart width", WIDTH, m.heart_mm, "mm", HEART,
                     ((r_col, float(r_row), 0.0), (l_col, float(l_row), 0.0))),
            Measured("Thoracic width", WIDTH, m.thoracic_mm, "mm", THORAX,
                     ((m.thorax_cols[0], float(m.thorax_row), 0.0), (m.thorax_cols[1], float(m.thorax_row), 0.0))),
        )
        classification = Classification(
            name="Cardiomegaly by CTR",
            concept=CARDIOMEGALY,
            value=value,
            score=round(ctr, 3),
            score_unit="1",
            details={"heart width (mm)": m.heart_mm, "thoracic width (mm)": m.thoracic_mm, "cut-off": p.ctr_cutoff},
            measurements=measured,
        )
        segments = tuple(
            Segment(label.name, label.category, label.type, mask, self._laterality.get(label.name))
            for label, mask in zip(self.manifest.outputs, (right[np.newaxis], left[np.newaxis]), strict=True)
        )
        notes = (f"heart {m.heart_mm:.0f} mm, thorax {m.thoracic_mm:.0f} mm, CTR {ctr:.2f}: "
                 f"cardiomegaly {value.meaning.lower()}",)
        return ModelResult(self.manifest.name, self.manifest.version, segments=segments, notes=notes,
                           classifications=(classification,))
