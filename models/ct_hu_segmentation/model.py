"""Classical CT segmentation: body, right/left lung and bone from Hounsfield units + morphology.

No trained weights. Outline of :meth:`CtHuSegmentation.run` (all thresholds in :class:`HuSegParams`):

Body
    ``HU > body_hu``; an in-plane opening of radius ``table_opening_mm`` (on a ~1.5 mm grid)
    cuts thin dense structures such as the CT table and cables; the largest 3-D component is
    kept together with components at least ``body_keep_fraction`` of its size (arms); the
    kept components are grown by one grid step inside the full-resolution threshold mask (to
    restore the skin line) and holes are filled slice by slice. A table separated from the
    skin by a few mm of air is excluded entirely; one lying against the skin loses all but
    the layer next to the skin.
Lungs
    ``HU < lung_hu`` inside the body eroded by ``lung_margin_mm`` (so outside air and the skin's
    partial-volume rim never count). 3-D components under ``min_lung_component_ml`` are dropped,
    and so are gas pockets: components whose eroded core has a median below ``gas_core_hu``
    (nearly pure air, unlike lung parenchyma) and whose volume is under ``gas_max_ml``. Sides
    come from patient coordinates (``Volume.affine``; LPS +x is patient left) relative to the
    trunk's centre: a component that lies on both sides (lungs joined by airways or at the
    anterior junction) is eroded on a ~4 mm grid until it falls apart into pieces on both
    sides; every voxel goes to the nearest piece. If it never falls apart it is cut at the
    midline plane. Airways are not separated: trachea and main bronchi end up in the lungs.
Bone
    Cortical bone (``HU > bone_hu``) and the cancellous bone it encloses (vertebral bodies,
    ribs, medullary cavities), but not the spinal canal or an intervertebral disc: see
    :mod:`models.ct_hu_segmentation.bone` (thresholds in :class:`BoneParams`). Vascular
    calcifications can be included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from models.base import Manifest, ModelResult, Segment, Volume, check_input
from models.ct_hu_segmentation.airways import AirwayParams, find_airways
from models.ct_hu_segmentation.bone import BoneParams, bbox, segment_bone
from models.ct_hu_segmentation.inplane import both, diamond, dilate, erode
from models.ct_hu_segmentation.volume_cache import VolumeCache
from models.errors import ManifestError
from models.manifest import MANIFEST_FILENAME, ManifestFile, load_manifest_file

MANIFEST_PATH = Path(__file__).with_name(MANIFEST_FILENAME)

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float32]

_CROSS_2D = np.zeros((3, 3, 3), dtype=bool)
_CROSS_2D[1] = ndi.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class HuSegParams:
    """Thresholds of the classical pipeline (HU, mm, ml); ``bone`` for the Bone segment."""

    body_hu: float = -500.0
    table_opening_mm: float = 4.0
    body_keep_fraction: float = 0.05
    work_mm: float = 1.5
    lung_hu: float = -400.0
    lung_margin_mm: float = 2.0
    min_lung_component_ml: float = 20.0
    gas_core_hu: float = -940.0
    gas_max_ml: float = 500.0
    split_grid_mm: float = 4.0
    split_max_erosions: int = 8
    split_min_fraction: float = 0.05
    bone: BoneParams = field(default_factory=BoneParams)


SEGMENT_NAMES = ("Body", "Right Lung", "Left Lung", "Bone", "Airway")
"""The model's segments, in SEG order (Airway: trachea and main bronchi, taken out of the lungs)."""


class CtHuSegmentation:
    """The ``ct-hu-segmentation`` model (stateless between calls; safe to reuse)."""

    def __init__(self, params: HuSegParams | None = None, manifest_path: Path = MANIFEST_PATH) -> None:
        spec: ManifestFile = load_manifest_file(manifest_path)
        self.manifest: Manifest = spec.to_manifest()
        self.params = params or HuSegParams()
        self.airways = AirwayParams()
        self._labels = {o.name: o for o in self.manifest.outputs}
        self._laterality = {o.name: spec.laterality(o.name) for o in self.manifest.outputs}
        expected = set(SEGMENT_NAMES)
        if set(self._labels) != expected:
            raise ManifestError(f"{manifest_path}: outputs must be {sorted(expected)}, got {sorted(self._labels)}")

    def check(self, volume: Volume) -> None:
        """Raise :class:`UnsuitableInput` unless ``volume`` is a CT with enough, stacked slices."""
        check_input(self.manifest, volume)

    def run(self, volume: Volume) -> ModelResult:
        """Segment ``volume``; every declared segment is returned (empty ones are noted)."""
        self.check(volume)
        body = body_mask(volume, self.params)
        # Bone needs only the body: it runs beside the lungs and airways (on two threads when allowed).
        bone, chest = both(
            lambda: segment_bone(volume.voxels, body[0], volume.spacing, self.params.bone),
            lambda: chest_masks(volume, self.params, self.airways, body),
        )
        notes = [*chest.notes, chest.airway_note]
        masks = {
            "Body": chest.body,
            "Right Lung": chest.right & ~chest.airways,  # the trachea and main bronchi are not lung
            "Left Lung": chest.left & ~chest.airways,
            "Bone": bone,
            "Airway": chest.airways,
        }
        segments = []
        for name in SEGMENT_NAMES:
            label = self._labels[name]
            mask = masks[name]
            if not mask.any():
                notes.append(f"{name}: empty")
            segments.append(Segment(name, label.category, label.type, mask, self._laterality[name]))
        return ModelResult(
            model_name=self.manifest.name,
            model_version=self.manifest.version,
            segments=tuple(segments),
            notes=tuple(notes),
        )


@dataclass(frozen=True)
class ChestMasks:
    """What the chest models share (read-only arrays). ``right`` and ``left`` still hold the airways,
    as :func:`segment_ct` returns them; ``notes`` are its notes, ``airway_note`` that of the airways."""

    body: BoolArray
    right: BoolArray
    left: BoolArray
    airways: BoolArray
    notes: tuple[str, ...]
    airway_note: str


Body = tuple[BoolArray, npt.NDArray[np.float64] | None]
"""The body mask and the (i, j, k) centre of the trunk (None: no body)."""

_BODY: VolumeCache[Body] = VolumeCache()
_CHEST: VolumeCache[ChestMasks] = VolumeCache()


def body_mask(volume: Volume, params: HuSegParams) -> Body:
    """The first step of :func:`segment_ct` (read-only mask), computed once per read-only volume."""

    def compute() -> Body:
        body, centre = _body(volume.voxels, volume, params)
        body.setflags(write=False)
        return body, centre

    return _BODY.get(volume, params, compute)


def chest_masks(
    volume: Volume, params: HuSegParams, airway_params: AirwayParams, body: Body | None = None
) -> ChestMasks:
    """:func:`segment_ct` and :func:`find_airways` of ``volume``, computed once for the chest models
    that run on the same read-only volume (see :mod:`models.ct_hu_segmentation.volume_cache`);
    ``body``: :func:`body_mask` of this volume and ``params`` (called when None)."""

    def compute() -> ChestMasks:
        masks, notes = segment_ct(volume, params, body or body_mask(volume, params))
        airways, note = find_airways(volume.voxels, masks["Right Lung"], masks["Left Lung"], volume, airway_params)
        chest = ChestMasks(masks["Body"], masks["Right Lung"], masks["Left Lung"], airways, tuple(notes), note)
        for mask in (chest.body, chest.right, chest.left, chest.airways):
            mask.setflags(write=False)
        return chest

    return _CHEST.get(volume, (params, airway_params), compute)


def forget_chest_masks() -> None:
    """Drop the masks kept for the last volume now (their memory), not when it is collected."""
    _BODY.clear()
    _CHEST.clear()


# --------------------------------------------------------------------------------------------
# The pipeline (pure functions of the voxels and the affine).


def segment_ct(
    volume: Volume, params: HuSegParams, body: Body | None = None
) -> tuple[dict[str, BoolArray], list[str]]:
    """Masks by name ("Body", "Right Lung", "Left Lung") and human-readable notes (Bone: :func:`segment_bone`);
    ``body``: :func:`body_mask` of this volume and ``params`` when already computed."""
    hu = volume.voxels
    notes: list[str] = []
    inside, trunk_center_ijk = body or _body(hu, volume, params)
    if trunk_center_ijk is None:
        empty = np.zeros(hu.shape, dtype=bool)
        return {"Body": empty, "Right Lung": empty.copy(), "Left Lung": empty.copy()}, [
            "no body found (nothing above the body threshold)"
        ]
    x_mid = float(volume.to_patient(trunk_center_ijk)[0])
    right, left = _lungs(hu, inside, volume, x_mid, params, notes)
    return {"Body": inside, "Right Lung": right, "Left Lung": left}, notes


def _inplane_disk(radius_mm: float, step_j_mm: float, step_i_mm: float) -> BoolArray:
    """A (1, n, m) elliptical disk of ``radius_mm`` for a grid with the given steps (at least a cross)."""
    rj = max(1, int(radius_mm / step_j_mm))
    ri = max(1, int(radius_mm / step_i_mm))
    jj, ii = np.mgrid[-rj : rj + 1, -ri : ri + 1]
    disk = (jj * step_j_mm) ** 2 + (ii * step_i_mm) ** 2 <= max(radius_mm, step_j_mm, step_i_mm) ** 2 + 1e-6
    return disk[None]


def _body(hu: FloatArray, volume: Volume, p: HuSegParams) -> tuple[BoolArray, npt.NDArray[np.float64] | None]:
    """Body mask and the (i, j, k) centre of the trunk (largest component); None if no body."""
    _, sj, si = volume.spacing
    fj = max(1, round(p.work_mm / sj))
    fi = max(1, round(p.work_mm / si))
    thr = hu > p.body_hu
    low = thr[:, ::fj, ::fi]
    disk = _inplane_disk(p.table_opening_mm, sj * fj, si * fi)[0]
    opened = dilate(erode(low, disk), disk)  # an in-plane opening
    lab, n = ndi.label(opened)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool), None
    counts = np.bincount(lab.ravel(), minlength=n + 1)
    counts[0] = 0
    largest = int(np.argmax(counts))
    keep = counts >= p.body_keep_fraction * counts[largest]
    keep[0] = False
    selected = keep[lab]
    k_c, j_c, i_c = ndi.center_of_mass(lab == largest)
    center_ijk = np.array([i_c * fi, j_c * fj, k_c], dtype=np.float64)
    # One grid step of margin restores the skin line at full resolution (via ``& thr``) without
    # reaching across the air gap to a table the opening cut off.
    grown = dilate(selected, diamond(1))
    up = grown.repeat(fj, axis=1).repeat(fi, axis=2)[:, : hu.shape[1], : hu.shape[2]]
    body = up & thr
    return _fill_holes_per_slice(body), center_ijk


def _fill_holes_per_slice(mask: BoolArray, max_hole_voxels: int | None = None) -> BoolArray:
    """Fill in-plane holes of every slice (background not connected to the slice border).

    With ``max_hole_voxels``, only holes of at most that many pixels are filled.
    """
    box = bbox(mask, pad=1)
    if box is None:
        return mask.copy()
    out = mask.copy()
    out[box] = _fill_holes_cropped(mask[box], max_hole_voxels)
    return out


def _fill_holes_cropped(mask: BoolArray, max_hole_voxels: int | None) -> BoolArray:
    lab, n = ndi.label(~mask, structure=_CROSS_2D)
    keep_bg = np.zeros(n + 1, dtype=bool)
    for edge in (lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]):
        keep_bg[np.unique(edge)] = True
    if max_hole_voxels is not None:
        keep_bg |= np.bincount(lab.ravel(), minlength=n + 1) > max_hole_voxels
    keep_bg[0] = False
    return ~keep_bg[lab]


def _x_coords(volume: Volume, box: tuple[slice, ...]) -> npt.NDArray[np.float32]:
    """LPS x (mm) of every voxel in ``box`` (slices over k, j, i), as a float32 array of the box shape."""
    a = volume.affine
    k = a[0, 2] * np.arange(box[0].start, box[0].stop) + a[0, 3]
    j = a[0, 1] * np.arange(box[1].start, box[1].stop)
    i = a[0, 0] * np.arange(box[2].start, box[2].stop)
    x = k.astype(np.float32)[:, None, None] + j.astype(np.float32)[None, :, None]
    return x + i.astype(np.float32)[None, None, :]


def _lungs(
    hu: FloatArray, body: BoolArray, volume: Volume, x_mid: float, p: HuSegParams, notes: list[str]
) -> tuple[BoolArray, BoolArray]:
    """Right and left lung masks (see the module docstring)."""
    _, sj, si = volume.spacing
    right = np.zeros(hu.shape, dtype=bool)
    left = np.zeros(hu.shape, dtype=bool)
    margin = max(1, round(p.lung_margin_mm / min(sj, si)))
    air = (hu < p.lung_hu) & body
    # Everything below happens in the box of ``air`` (grown in-plane by the erosion's reach).
    crop = bbox(air, pad=margin)
    if crop is None:
        return right, left
    cand = air[crop] & erode(body[crop], diamond(margin))  # air inside the body less its rim
    del air
    lab, n = ndi.label(cand)
    del cand
    if n == 0:
        return right, left
    counts = np.bincount(lab.ravel(), minlength=n + 1)
    vml = volume.voxel_volume_ml
    boxes = ndi.find_objects(lab)
    for label in np.nonzero(counts * vml >= p.min_lung_component_ml)[0]:
        if label == 0:
            continue
        local = boxes[label - 1]
        if local is None:
            continue
        comp = lab[local] == label
        box = tuple(slice(b.start + c.start, b.stop + c.start) for b, c in zip(local, crop, strict=True))
        vol_ml = float(counts[label] * vml)
        core = erode(comp, diamond(2))
        core_median = float(np.median(hu[box][core if core.any() else comp]))
        if core_median < p.gas_core_hu and vol_ml < p.gas_max_ml:
            notes.append(f"rejected a {vol_ml:.0f} ml air pocket (core median {core_median:.0f} HU) as gas")
            continue
        x = _x_coords(volume, box)
        on_right = x < x_mid
        frac_right = float(on_right[comp].mean())
        if frac_right >= 0.9:
            right[box] |= comp
        elif frac_right <= 0.1:
            left[box] |= comp
        else:
            side = _split_sides(comp, box, volume, x_mid, p)
            if side is None:
                notes.append(f"lungs split at the midline plane (x = {x_mid:.1f} mm)")
                side = on_right
            right[box] |= comp & side
            left[box] |= comp & ~side
    return right, left


def _split_sides(
    comp: BoolArray, box: tuple[slice, ...], volume: Volume, x_mid: float, p: HuSegParams
) -> BoolArray | None:
    """True where a voxel of ``comp`` belongs to the right lung; None if erosion never splits it."""
    sk, sj, si = volume.spacing
    f = tuple(max(1, round(p.split_grid_mm / s)) for s in (sk, sj, si))
    coarse = comp[:: f[0], :: f[1], :: f[2]]
    total = int(coarse.sum())
    if total == 0:
        return None
    eroded = coarse
    seeds: npt.NDArray[np.int8] | None = None
    for _ in range(p.split_max_erosions + 1):
        lab, n = ndi.label(eroded)
        if n == 0:
            break
        counts = np.bincount(lab.ravel(), minlength=n + 1)
        big = [lb for lb in range(1, n + 1) if counts[lb] >= p.split_min_fraction * total]
        if len(big) >= 2:
            centers = ndi.center_of_mass(eroded, lab, big)
            ijk = np.array(
                [[c[2] * f[2] + box[2].start, c[1] * f[1] + box[1].start, c[0] * f[0] + box[0].start] for c in centers]
            )
            is_right = volume.to_patient(ijk)[:, 0] < x_mid
            if is_right.any() and not is_right.all():
                seeds = np.zeros(coarse.shape, dtype=np.int8)
                for lb, r in zip(big, is_right, strict=True):
                    seeds[lab == lb] = 1 if r else 2
                break
        eroded = ndi.binary_erosion(eroded)
    if seeds is None:
        return None
    # Nearest seed for every coarse voxel, then back to full resolution by index.
    _, (ik, ij, ii) = ndi.distance_transform_edt(
        seeds == 0, sampling=(sk * f[0], sj * f[1], si * f[2]), return_indices=True
    )
    side_coarse = seeds[ik, ij, ii] == 1
    shape = comp.shape
    return side_coarse[
        (np.arange(shape[0]) // f[0])[:, None, None],
        (np.arange(shape[1]) // f[1])[None, :, None],
        (np.arange(shape[2]) // f[2])[None, None, :],
    ]
