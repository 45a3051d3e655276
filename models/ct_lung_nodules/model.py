"""Classical lung nodule candidate detection on CT: a multi-scale blob detector (no trained weights).

Outline of :meth:`CtLungNodules.run` (all thresholds in :class:`NoduleParams`):

Search region
    Right and left lung from :func:`models.ct_hu_segmentation.model.segment_ct` (nodules are
    holes or pleural notches in these air-density masks) less the trachea and bronchi tracked by
    :func:`models.ct_hu_segmentation.airways.find_airways`. Each lung is closed with a ball of
    ``closing_mm`` and its holes filled (on a ~2 mm grid), then grown by ``margin_mm``: the region
    holds intrapulmonary and juxtapleural nodules but little chest wall or mediastinum. Fewer
    than ``min_lung_ml`` of lung is :class:`UnsuitableInput`.
Blobs
    Inside the region's bounding box the HU image is clipped to ``clip_hu`` and everything outside
    the closed lungs is set to the lungs' median HU (so the chest wall does not respond). For
    sigmas from ``min_diameter_mm / (2 sqrt 3)`` to ``max_mass_mm / (2 sqrt 3)``
    (``scales_per_octave`` per doubling; a ball of radius r responds most at sigma = r / sqrt 3)
    the scale-normalised Laplacian of Gaussian ``R = -sigma^2 * LoG`` is computed on a
    block-averaged grid of about sigma / 2. Thick slices (spacing s from ``thick_slice_mm`` = 3 mm
    up to ``max_slice_mm`` = 5 mm; thickness taken equal to the spacing): each slice has already
    averaged a slab of s along z, a box of variance s^2 / 12, so the Gaussian along z is narrowed
    by that much and the total smoothing stays isotropic at sigma (the same way block averaging is
    accounted for). Thinner slices are smoothed in full: there the slab is small and narrowing
    the Gaussian lets noise in low-density lung (emphysema) through as 4-5 mm blobs. Local
    maxima (26 neighbours) inside the region are candidates; their ``strength`` is
    ``R / (0.925 * reference_contrast_hu)``: 1.0 for an ideal solid ball of that contrast at its
    best scale (0.925 is the peak normalised response of a ball). Candidates under
    ``min_strength`` are dropped.
Shape
    The Hessian at the candidate gives eigenvalues l1 <= l2 <= l3; ``sphericity = l3 / l1``
    (1 for a ball, about 0 for a tube or a plate; 0 unless all are negative). Candidates under
    ``min_sphericity`` are vessels, fissures or walls. Non-maximum suppression then keeps the
    strongest of candidates whose centres lie inside each other's spheres.
Measurement
    Around each candidate the voxels above ``solid_hu`` inside a ball of 1.5 radii (r = sqrt 3
    sigma) and inside the closed lungs, connected to the central voxels, are the nodule: its
    centroid is the centre, its extent the bounding box and the diameter of the sphere of equal
    volume the diameter. Candidates without a solid core, with a diameter outside
    ``[min_diameter_mm, max_mass_mm]`` or with less than ``min_lung_surround`` of lung in a
    shell 2-6 mm outside the nodule (chest wall and mediastinal bumps; a juxtapleural nodule keeps
    more than half of it: 0.64-0.81 on the phantoms at 1-5 mm, hilar bumps between the main
    bronchi and the lungs 0.42-0.45) are dropped. Findings over ``max_diameter_mm`` (30 mm) are
    reported as masses (SCT 4147007), not nodules.
    ``compactness`` is the nodule's volume over that of the dense structure it is connected to
    within 2.5 nodule radii: about 1 for an isolated nodule, low for a vessel bifurcation.
Confidence
    ``min(strength, 1) * sqrt(sphericity * compactness)`` in [0, 1], a ranking score (not a
    probability); candidates under ``min_confidence`` are dropped and a final non-maximum
    suppression on the measured diameters removes duplicates. On the phantoms of
    :mod:`testkit.phantom` (spherical solid nodules, tapering vessel trees) isolated nodules of
    6 mm or more score above 0.5 and vessel bifurcations below 0.5.
Sensitivity
    Measured per slice thickness on phantoms (``python -m testkit.thick_slices``), stated in the
    manifest (``sensitivity_by_slice_thickness``) and reported with every result
    (:meth:`CtLungNodules.figures`: DCM 111089 "Lesion Sensitivity", %).
Limits
    Juxtapleural nodules are found while the closing fills their pleural notch (up to about
    ``2 * closing_mm`` in diameter); part-solid and ground-glass nodules respond weakly; nodules
    attached to vessels score lower (compactness).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from models.base import (
    Code,
    Detection,
    Figure,
    Manifest,
    ModelResult,
    Segment,
    UnsuitableInput,
    Volume,
    check_input,
)
from models.ct_hu_segmentation.airways import AirwayParams, find_airways
from models.ct_hu_segmentation.inplane import thread_map
from models.ct_hu_segmentation.model import HuSegParams, chest_masks
from models.errors import ManifestError
from models.manifest import MANIFEST_FILENAME, load_manifest, load_manifest_file

MANIFEST_PATH = Path(__file__).with_name(MANIFEST_FILENAME)

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float32]
Box = tuple[slice, slice, slice]

LESION_SENSITIVITY = Code("111089", "DCM", "Lesion Sensitivity")
"""CID 6048 "CAD Operating Point Axis Label": the fraction of lesions the detector finds."""
BALL_PEAK = 0.925  # max over sigma of sigma^2 * |LoG| at the centre of a unit-contrast ball
_OFFSETS = np.array([o for o in itertools.product((-1, 0, 1), repeat=3) if o != (0, 0, 0)], dtype=np.intp)


@dataclass(frozen=True)
class NoduleParams:
    """Thresholds (HU, mm, ml) of the classical detector."""

    min_diameter_mm: float = 4.0
    max_diameter_mm: float = 30.0
    """Larger findings are masses (up to ``max_mass_mm``), not nodules (Fleischner: a nodule is <= 3 cm)."""
    max_mass_mm: float = 60.0
    scales_per_octave: int = 4
    min_lung_ml: float = 20.0
    max_slice_mm: float = 5.0
    thick_slice_mm: float = 3.0
    """From this slice spacing on, the slab of a slice counts as smoothing along z (see Blobs)."""
    closing_mm: float = 8.0
    margin_mm: float = 2.0
    clip_hu: tuple[float, float] = (-1000.0, 100.0)
    reference_contrast_hu: float = 900.0
    min_strength: float = 0.3
    min_sphericity: float = 0.35
    min_lung_surround: float = 0.55
    min_confidence: float = 0.4
    solid_hu: float = -400.0
    max_detections: int = 50
    max_segmented: int = 10
    """Candidates also returned as segments (each a full-size mask), most confident first."""
    airways: AirwayParams = field(default_factory=AirwayParams)
    segmentation: HuSegParams = field(default_factory=HuSegParams)


@dataclass(frozen=True)
class Candidate:
    """A measured nodule candidate in voxel indices of the source volume (k, j, i order).

    ``strength``, ``sphericity``, ``lung_surround`` and ``compactness`` are the figures of the
    module docstring (about 1 for an ideal isolated solid ball in lung).
    """

    centre_kji: tuple[float, float, float]
    bbox_min_kji: tuple[int, int, int]
    bbox_max_kji: tuple[int, int, int]
    diameter_mm: float
    strength: float
    sphericity: float
    lung_surround: float
    compactness: float
    voxels_kji: npt.NDArray[np.intp] = field(default_factory=lambda: np.zeros((0, 3), np.intp), compare=False)
    """(n, 3) indices of the segmented solid core."""

    @property
    def confidence(self) -> float:
        """``min(strength, 1) * sqrt(sphericity * compactness)``, each clipped to [0, 1]."""
        terms = [min(max(v, 0.0), 1.0) for v in (self.strength, self.sphericity, self.compactness)]
        return float(terms[0] * np.sqrt(terms[1] * terms[2]))


class CtLungNodules:
    """The ``ct-lung-nodules`` model (stateless between calls; safe to reuse)."""

    def __init__(self, params: NoduleParams | None = None, manifest_path: Path = MANIFEST_PATH) -> None:
        self.manifest: Manifest = load_manifest(manifest_path)
        self.params = params or NoduleParams()
        names = [o.name for o in self.manifest.outputs]
        if names != ["Nodule", "Mass"]:
            raise ManifestError(f"{manifest_path}: outputs must be ['Nodule', 'Mass'], got {names}")
        self._outputs = {o.name: o for o in self.manifest.outputs}
        self._sensitivity = load_manifest_file(manifest_path).sensitivity_by_slice_thickness or {}

    def check(self, volume: Volume) -> None:
        """Raise :class:`UnsuitableInput` unless ``volume`` is an axial CT with enough, thin slices."""
        check_input(self.manifest, volume, max_slice_mm=self.params.max_slice_mm, axial=True)

    def run(self, volume: Volume) -> ModelResult:
        """Nodule candidates, strongest first; :class:`UnsuitableInput` if there is too little lung."""
        self.check(volume)
        p = self.params
        chest = chest_masks(volume, p.segmentation, p.airways)
        notes = list(chest.notes)
        lungs = chest.right | chest.left
        lung_ml = float(lungs.sum() * volume.voxel_volume_ml)
        if lung_ml < p.min_lung_ml:
            raise UnsuitableInput(
                f"{self.manifest.name}: only {lung_ml:.1f} ml of lung in the series "
                f"(needs at least {p.min_lung_ml:.0f} ml): no lungs to search"
            )
        candidates = detect_nodules(volume.voxels, chest.right, chest.left, volume, p, chest.airways)
        detections = []
        counts = {"Nodule": 0, "Mass": 0}
        for c in candidates:
            kind = self.kind(c)
            counts[kind] += 1
            n = counts[kind]
            ijk = (c.centre_kji[2], c.centre_kji[1], c.centre_kji[0])
            lps = volume.to_patient(ijk)
            detections.append(
                Detection(
                    label=f"{kind} {n}",
                    type=self._outputs[kind].type,
                    centre_ijk=(float(ijk[0]), float(ijk[1]), float(ijk[2])),
                    centre_lps=(float(lps[0]), float(lps[1]), float(lps[2])),
                    bbox_ijk_min=(c.bbox_min_kji[2], c.bbox_min_kji[1], c.bbox_min_kji[0]),
                    bbox_ijk_max=(c.bbox_max_kji[2], c.bbox_max_kji[1], c.bbox_max_kji[0]),
                    diameter_mm=c.diameter_mm,
                    confidence=c.confidence,
                    tracking_id=f"{kind.lower()}-{n}",
                )
            )
        notes.append(f"{counts['Nodule']} nodule candidate(s) and {counts['Mass']} mass(es) in {lung_ml:.0f} ml "
                     "of lung")
        segments = self._segments(candidates[: p.max_segmented], detections, volume.voxels.shape)
        if len(candidates) > len(segments):
            notes.append(f"the {len(segments)} most confident candidates are segmented")
        return ModelResult(
            model_name=self.manifest.name,
            model_version=self.manifest.version,
            notes=tuple(notes),
            detections=tuple(detections),
            segments=segments,
            figures=self.figures(volume),
        )

    def kind(self, candidate: Candidate) -> str:
        """``Mass`` over ``max_diameter_mm`` (30 mm), else ``Nodule``."""
        return "Mass" if candidate.diameter_mm > self.params.max_diameter_mm else "Nodule"

    def sensitivity_at(self, slice_mm: float) -> float | None:
        """Measured sensitivity (nodules >= 6 mm, phantoms) at the manifest's thickness nearest
        ``slice_mm`` (the larger one of a tie, the more conservative figure); None without a table."""
        if not self._sensitivity:
            return None
        nearest = min(self._sensitivity, key=lambda mm: (abs(mm - slice_mm), -mm))
        return self._sensitivity[nearest]

    def figures(self, volume: Volume) -> tuple[Figure, ...]:
        """The measured sensitivity at this series' slice spacing, for the report (SR, PDF)."""
        slice_mm = volume.spacing[0]
        sensitivity = self.sensitivity_at(slice_mm)
        if sensitivity is None:
            return ()
        return (Figure(LESION_SENSITIVITY, 100.0 * sensitivity, "%",
                       f"sensitivity for solid nodules >= 6 mm on phantoms with {slice_mm:.1f} mm slices "
                       "(testkit.thick_slices)"),)

    def _segments(self, candidates: list[Candidate], detections: list[Detection],
                  shape: tuple[int, ...]) -> tuple[Segment, ...]:
        """One segment per candidate, named like its detection; a voxel goes to the more confident
        candidate, so segments never overlap (a LABELMAP SEG can hold them)."""
        out = []
        taken = np.zeros(shape, dtype=bool)
        for cand, det in zip(candidates, detections, strict=False):
            output = self._outputs[self.kind(cand)]
            mine = tuple(cand.voxels_kji[~taken[tuple(cand.voxels_kji.T)]].T)
            mask = np.zeros(shape, dtype=bool)
            mask[mine] = True
            taken[mine] = True
            out.append(Segment(det.label, output.category, output.type, mask))
        return tuple(out)


# --------------------------------------------------------------------------------------------
# The pipeline (pure functions of the voxels, the lung masks and the geometry).


def detect_nodules(
    hu: FloatArray, right: BoolArray, left: BoolArray, volume: Volume, p: NoduleParams, airways: BoolArray | None = None
) -> list[Candidate]:
    """Measured nodule candidates, strongest first; the ``airways`` (:func:`find_airways`, computed when
    None) are taken out of ``right`` and ``left``."""
    if airways is None:
        airways, _ = find_airways(hu, right, left, volume, p.airways)
    right = right & ~airways
    left = left & ~airways
    lungs = right | left
    if not lungs.any():
        return []
    spacing = np.asarray(volume.spacing, dtype=np.float64)  # (k, j, i) mm
    closed, region = search_region(right, left, spacing, p)
    sigmas = _sigmas(p)
    pad = np.ceil(3.0 * sigmas[-1] / spacing).astype(int) + 1
    box = _bbox(region, pad)
    if box is None:
        return []
    sub_hu = hu[box]
    sub_region = region[box]
    sub_closed = closed[box]
    sub_lungs = lungs[box]
    lung_hu = float(np.median(sub_hu[sub_lungs])) if sub_lungs.any() else -850.0
    lo, hi = p.clip_hu
    img = np.clip(sub_hu, lo, hi).astype(np.float32, copy=False)
    img[~sub_closed] = lung_hu
    raw = _blob_maxima(img, sub_region, spacing, sigmas, p)
    # Strongest first; drop weaker candidates whose centre lies inside a stronger one's sphere.
    raw.sort(key=lambda c: -c[2] * np.sqrt(c[3]))
    kept = _suppress([(pos, np.sqrt(3.0) * sigma) for pos, sigma, _, _ in raw], spacing)
    measured: list[Candidate] = []
    for index in kept:
        pos, sigma, strength, sphericity = raw[index]
        cand = _measure(sub_hu, sub_closed, sub_lungs, spacing, pos, np.sqrt(3.0) * sigma, strength, sphericity, p)
        if cand is not None and cand.confidence >= p.min_confidence:
            measured.append(cand)
    measured.sort(key=lambda c: -c.confidence)
    final = _suppress([(np.asarray(c.centre_kji), c.diameter_mm / 2) for c in measured], spacing)
    shift = np.array([sl.start for sl in box])
    return [
        dataclasses.replace(
            measured[index],
            centre_kji=_f3(np.asarray(measured[index].centre_kji) + shift),
            bbox_min_kji=_i3(np.asarray(measured[index].bbox_min_kji) + shift),
            bbox_max_kji=_i3(np.asarray(measured[index].bbox_max_kji) + shift),
            voxels_kji=measured[index].voxels_kji + shift,
        )
        for index in final[: p.max_detections]
    ]


def _f3(a: npt.ArrayLike) -> tuple[float, float, float]:
    x, y, z = (float(v) for v in np.asarray(a, dtype=np.float64).ravel())
    return x, y, z


def _i3(a: npt.ArrayLike) -> tuple[int, int, int]:
    x, y, z = (int(v) for v in np.asarray(a).ravel())
    return x, y, z


def search_region(
    right: BoolArray, left: BoolArray, spacing: npt.NDArray[np.float64], p: NoduleParams
) -> tuple[BoolArray, BoolArray]:
    """(closed, grown): each lung closed by ``closing_mm`` with holes filled, and that grown by ``margin_mm``.

    Computed on a grid of about 2 mm (a voxel of it is lung if any voxel in it is).
    """
    f = tuple(max(1, round(2.0 / s)) for s in spacing)
    coarse_spacing = spacing * np.array(f)
    shape = tuple(int(np.ceil(n / fi)) for n, fi in zip(right.shape, f, strict=True))
    closed_all = np.zeros(shape, dtype=bool)
    grown_all = np.zeros(shape, dtype=bool)
    reach = int(np.ceil((p.closing_mm + p.margin_mm) / coarse_spacing.min())) + 1
    inner = (slice(reach, -reach),) * 3

    def one(lung: BoolArray) -> tuple[Box, BoolArray, BoolArray] | None:  # the two lungs run on two threads
        coarse = _block_any(lung, f)
        box = _bbox(coarse, np.full(3, reach))
        if box is None:
            return None
        # Closing by distance transforms (a ball of closing_mm) on the lung's box, padded so that
        # the array border does not cut it.
        padded = np.pad(coarse[box], reach)
        dilated = ndi.distance_transform_edt(~padded, sampling=coarse_spacing) <= p.closing_mm
        closed = ndi.distance_transform_edt(dilated, sampling=coarse_spacing) > p.closing_mm
        closed = ndi.binary_fill_holes(closed | padded)
        grown = ndi.distance_transform_edt(~closed, sampling=coarse_spacing) <= p.margin_mm
        return box, closed[inner], grown[inner]

    for done in thread_map(one, (right, left)):
        if done is not None:
            box, closed, grown = done
            closed_all[box] |= closed
            grown_all[box] |= grown
    return _upsample(closed_all, f, right.shape), _upsample(grown_all, f, right.shape)


def _upsample(coarse: BoolArray, f: tuple[int, ...], shape: tuple[int, ...]) -> BoolArray:
    """Each coarse voxel repeated over its ``f`` block, cut to ``shape`` (a view of whole blocks)."""
    n = coarse.shape
    blocks = np.broadcast_to(coarse[:, None, :, None, :, None], (n[0], f[0], n[1], f[1], n[2], f[2]))
    return blocks.reshape(n[0] * f[0], n[1] * f[1], n[2] * f[2])[: shape[0], : shape[1], : shape[2]]


def _sigmas(p: NoduleParams) -> npt.NDArray[np.float64]:
    lo = p.min_diameter_mm / (2.0 * np.sqrt(3.0))
    hi = max(p.max_diameter_mm, p.max_mass_mm) / (2.0 * np.sqrt(3.0))
    n = int(np.ceil(np.log2(hi / lo) * p.scales_per_octave)) + 1
    return np.asarray(np.geomspace(lo, hi, n), dtype=np.float64)


def _bbox(mask: BoolArray, pad: npt.NDArray[np.int_]) -> Box | None:
    if not mask.any():
        return None
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append(
            slice(max(0, int(idx[0]) - int(pad[axis])), min(mask.shape[axis], int(idx[-1]) + 1 + int(pad[axis])))
        )
    return out[0], out[1], out[2]


def _block_any(mask: BoolArray, f: tuple[int, ...]) -> BoolArray:
    """True where any voxel of an ``f`` block (a partial last one too) is set; ``mask`` itself for blocks
    of one voxel. One axis at a time, OR-ing strided views."""
    out = mask
    for axis, fi in enumerate(f):
        if fi > 1:
            acc = np.zeros((*out.shape[:axis], -(-out.shape[axis] // fi), *out.shape[axis + 1 :]), dtype=bool)
            for offset in range(fi):
                part = out[(slice(None),) * axis + (slice(offset, None, fi),)]
                acc[(slice(None),) * axis + (slice(0, part.shape[axis]),)] |= part
            out = acc
    return out


def _block_mean(img: FloatArray, f: tuple[int, ...]) -> FloatArray:
    """Mean of each whole ``f`` block (a partial last block is dropped)."""
    n = [s // fi * fi for s, fi in zip(img.shape, f, strict=True)]
    cut = img[: n[0], : n[1], : n[2]]
    blocks = cut.reshape(n[0] // f[0], f[0], n[1] // f[1], f[1], n[2] // f[2], f[2])
    return np.asarray(blocks.mean(axis=(1, 3, 5), dtype=np.float32))


Peak = tuple[npt.NDArray[np.float64], float, float, float]  # position (k, j, i), sigma mm, strength, sphericity
Level = tuple[FloatArray, BoolArray, npt.NDArray[np.int_]]  # block means, blocks in the region, first block


def _blob_maxima(
    img: FloatArray,
    region: BoolArray,
    spacing: npt.NDArray[np.float64],
    sigmas: npt.NDArray[np.float64],
    p: NoduleParams,
) -> list[Peak]:
    """The spherical maxima of every scale, smallest sigma first. Each scale works on a box of its
    grid: the blocks holding ``region`` and two more on each side.
    ``img`` is constant outside the closed lungs (inside ``region``), so the Gaussian inside that
    box equals the one over the whole image, and the Laplacian and the 26-neighbour test at region
    voxels only read values inside it: the maxima are those of the whole image, for a fraction of
    the work. Scales are independent and run on :func:`thread_map`'s threads.
    """
    box = _bbox(region, np.zeros(3, dtype=int))
    if box is None:
        return []
    lo, hi = np.array([b.start for b in box]), np.array([b.stop for b in box])
    factors = [tuple(max(1, int(sigma / (2.0 * s))) for s in spacing) for sigma in sigmas]
    distinct = list(dict.fromkeys(factors))
    levels = dict(zip(distinct, thread_map(lambda f: _level(img, region, f, lo, hi), distinct), strict=True))
    per_scale = thread_map(
        lambda i: _scale_maxima(levels[factors[i]], float(sigmas[i]), factors[i], spacing, p), range(len(sigmas))
    )
    return [peak for peaks in per_scale for peak in peaks]


def _level(
    img: FloatArray, region: BoolArray, f: tuple[int, ...], lo: npt.NDArray[np.int_], hi: npt.NDArray[np.int_]
) -> Level:
    """The grid of block size ``f`` over the blocks holding region voxels ``lo`` to ``hi`` (exclusive)
    and two more on each side (whole blocks only, as :func:`_block_mean`)."""
    fa = np.array(f)
    start = np.maximum(lo // fa - 2, 0)
    stop = np.minimum((hi - 1) // fa + 3, np.array(img.shape) // fa)
    full = tuple(slice(int(a) * fi, int(b) * fi) for a, b, fi in zip(start, stop, f, strict=True))
    level_img = _block_mean(img[full], f) if f != (1, 1, 1) else img[full]
    return level_img, _block_any(region[full], f), start


def _scale_maxima(
    level: Level, sigma: float, f: tuple[int, ...], spacing: npt.NDArray[np.float64], p: NoduleParams
) -> list[Peak]:
    """The spherical maxima at ``sigma`` on its grid (block size ``f``), in image voxels."""
    level_img, level_region, start = level
    norm = BALL_PEAK * p.reference_contrast_hu
    # A thick slice (s = its spacing >= thick_slice_mm) already averaged a box of s along z: variance s^2 / 12.
    slab_var = np.array([spacing[0] ** 2 / 12.0 if spacing[0] >= p.thick_slice_mm else 0.0, 0.0, 0.0])
    h = spacing * np.array(f)
    box_var = spacing**2 * (np.array(f) ** 2 - 1) / 12.0  # block averaging already smoothed this much
    sig_vox = np.sqrt(np.maximum(sigma**2 - box_var - slab_var, 0.0)) / h
    g = ndi.gaussian_filter(level_img, sig_vox, mode="nearest", truncate=3.0)
    lap = _laplacian(g, h)
    scale = -(sigma**2) / norm  # strength = scale * lap, in float64 (negative: reference_contrast_hu > 0)
    peaks = _local_maxima(lap, scale, level_region, p.min_strength)
    if peaks.shape[0] == 0:
        return []
    sph = _sphericity(g, h, peaks)
    good = sph >= p.min_sphericity
    pos = (peaks[good] + start) * np.array(f) + (np.array(f) - 1) / 2.0
    strength = scale * lap[tuple(peaks[good].T)].astype(np.float64)
    return [
        (q.astype(np.float64), sigma, float(s_val), float(sp_val))
        for q, s_val, sp_val in zip(pos, strength, sph[good], strict=True)
    ]


def _laplacian(g: FloatArray, h: npt.NDArray[np.float64]) -> FloatArray:
    """Second differences summed over the axes (edges replicated), per mm^2."""
    lap: FloatArray | None = None
    term = np.empty_like(g)
    for axis in range(3):
        if g.shape[axis] >= 3:
            kernel = np.array([1.0, -2.0, 1.0]) / h[axis] ** 2
            ndi.correlate1d(g, kernel, axis=axis, mode="nearest", output=term)
            if lap is None:
                lap, term = term, np.empty_like(g)
            else:
                lap += term
    return lap if lap is not None else np.zeros_like(g)


def _local_maxima(lap: FloatArray, scale: float, region: BoolArray, threshold: float) -> npt.NDArray[np.intp]:
    """(n, 3) indices of voxels of ``region`` (off the border) whose strength ``scale * lap`` (float64,
    ``scale < 0``) exceeds ``threshold`` and is at least that of each of the 26 neighbours. Compared on
    ``lap``: a float64 product of float32 values by one negative number reverses their order exactly
    (ties stay ties); the threshold is applied loosely in float32, then exactly where that passes."""
    inner = np.zeros(lap.shape, dtype=bool)
    inner[1:-1, 1:-1, 1:-1] = True
    bound = np.float32(threshold / scale * (1.0 - 1e-4))  # a little above threshold / scale: lets all through
    idx = np.argwhere((lap < bound) & region & inner)
    idx = idx[scale * lap[tuple(idx.T)].astype(np.float64) > threshold]
    if idx.shape[0] == 0:
        return idx
    values = lap[tuple(idx.T)]
    is_max = np.ones(idx.shape[0], dtype=bool)
    for off in _OFFSETS:
        is_max &= values <= lap[tuple((idx + off).T)]
    return idx[is_max]


def _sphericity(g: FloatArray, h: npt.NDArray[np.float64], idx: npt.NDArray[np.intp]) -> npt.NDArray[np.float64]:
    """l3 / l1 of the Hessian of ``g`` at interior points ``idx`` (0 unless all eigenvalues are negative)."""
    hess = np.empty((idx.shape[0], 3, 3), dtype=np.float64)
    centre = g[tuple(idx.T)].astype(np.float64)
    unit = np.eye(3, dtype=np.intp)
    for a in range(3):
        plus = g[tuple((idx + unit[a]).T)]
        minus = g[tuple((idx - unit[a]).T)]
        hess[:, a, a] = (plus + minus - 2.0 * centre) / h[a] ** 2
        for b in range(a + 1, 3):
            pp = g[tuple((idx + unit[a] + unit[b]).T)]
            pm = g[tuple((idx + unit[a] - unit[b]).T)]
            mp = g[tuple((idx - unit[a] + unit[b]).T)]
            mm = g[tuple((idx - unit[a] - unit[b]).T)]
            hess[:, a, b] = hess[:, b, a] = (pp - pm - mp + mm) / (4.0 * h[a] * h[b])
    eig = np.linalg.eigvalsh(hess)  # ascending: l1 <= l2 <= l3
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where((eig[:, 2] < 0) & (eig[:, 0] < 0), eig[:, 2] / eig[:, 0], 0.0)
    return np.asarray(np.clip(ratio, 0.0, 1.0), dtype=np.float64)


def _suppress(items: list[tuple[npt.NDArray[np.float64], float]], spacing: npt.NDArray[np.float64]) -> list[int]:
    """Indices kept by non-maximum suppression over (position (k, j, i) voxels, radius mm), strongest first."""
    kept: list[int] = []
    kept_pos: list[npt.NDArray[np.float64]] = []
    kept_r: list[float] = []
    for index, (pos, radius) in enumerate(items):
        mm = np.asarray(pos, dtype=np.float64) * spacing
        if kept_pos:
            dist = np.linalg.norm(np.asarray(kept_pos) - mm, axis=1)
            if np.any(dist < np.maximum(np.asarray(kept_r), radius)):
                continue
        kept.append(index)
        kept_pos.append(mm)
        kept_r.append(radius)
    return kept


def _measure(
    hu: FloatArray,
    region: BoolArray,
    lungs: BoolArray,
    spacing: npt.NDArray[np.float64],
    pos: npt.NDArray[np.float64],
    radius_mm: float,
    strength: float,
    sphericity: float,
    p: NoduleParams,
) -> Candidate | None:
    """Segment the solid core around ``pos`` and measure it (None if it is not a nodule)."""
    # Room for the 1.5-radius ball, the 6 mm shell around the nodule and the 2.5-radius compactness ball.
    reach = max(1.5 * radius_mm + 6.0, 3.75 * radius_mm) + 2.0 * float(spacing.max())
    lo = np.maximum(np.floor(pos - reach / spacing).astype(int), 0)
    hi = np.minimum(np.ceil(pos + reach / spacing).astype(int) + 1, hu.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    grids = np.ogrid[box[0], box[1], box[2]]
    dist2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, pos, spacing, strict=True))
    solid = (hu[box] > p.solid_hu) & region[box]
    inside = solid & (dist2 <= (1.5 * radius_mm) ** 2)
    core = inside & (dist2 <= max(0.5 * radius_mm, float(spacing.max())) ** 2)
    if not core.any():
        return None
    lab, _ = ndi.label(inside)
    ids = np.unique(lab[core])
    nodule = np.isin(lab, ids[ids > 0])
    volume_mm3 = float(nodule.sum()) * float(np.prod(spacing))
    diameter = float(np.cbrt(6.0 * volume_mm3 / np.pi))
    if not p.min_diameter_mm <= diameter <= max(p.max_diameter_mm, p.max_mass_mm):
        return None
    r_nod = diameter / 2.0
    shell = (dist2 > (r_nod + 2.0) ** 2) & (dist2 <= (r_nod + 6.0) ** 2)
    surround = float(lungs[box][shell].mean()) if shell.any() else 0.0
    if surround < p.min_lung_surround:
        return None
    where = np.argwhere(nodule)
    wide = solid & (dist2 <= (2.5 * r_nod) ** 2)
    lab2, _ = ndi.label(wide)
    ids2 = np.unique(lab2[nodule])
    comp2 = np.isin(lab2, ids2[ids2 > 0])
    compactness = float(nodule.sum()) / float(comp2.sum())
    return Candidate(
        voxels_kji=(where + lo).astype(np.intp),
        centre_kji=_f3(where.mean(axis=0) + lo),
        bbox_min_kji=_i3(where.min(axis=0) + lo),
        bbox_max_kji=_i3(where.max(axis=0) + lo),
        diameter_mm=diameter,
        strength=strength,
        sphericity=sphericity,
        lung_surround=surround,
        compactness=compactness,
    )
