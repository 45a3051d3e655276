"""A synthetic chest CT with known truth, for tests and benchmarks (numpy + scipy.ndimage, no DICOM).

Geometry: ``hu[k, j, i]`` with i along LPS +x (towards the patient's left), j along +y (towards
the back) and k along +z (feet -> head). Voxel ``(i, j, k)`` lies at
``origin_lps + (i * pixel_mm, j * pixel_mm, k * slice_mm)``, so the patient's RIGHT lung is at
small column indices. :attr:`Phantom.affine` follows the convention of :mod:`models.base`.

Anatomy (scaled to the field of view; centred on ``shift_mm``): an elliptical trunk of soft
tissue (40 HU) under a fat layer (-100 HU); two lung ellipsoids (-850 HU) joined by a trachea and
main bronchi (-1000 HU); a vertebral column, sternum and rib slabs (600-700 HU); optionally a
stomach gas bubble (-1000 HU) below the lungs; a thin curved CT table (400 HU) under the body,
separated from it by air; air (-1000 HU) elsewhere; solid nodules (45 HU) inside the lungs.
Optional (off by default, so default phantoms are unchanged): branching tubular vessels (40 HU)
inside the lungs, emphysema (patches of lung at -980 HU replacing a given fraction of the lung
parenchyma), a rotation of the whole scene about the z axis through the anatomy centre, and
bones with marrow (a cortical shell around 170 HU cancellous bone, a vertebra whose neural arch
closes around a 15 HU spinal canal; truth "Bone" then includes "Marrow", never "Spinal Canal").
The label intensities are blurred in-plane (partial volume), Gaussian noise is added and the
result is clipped to [-1024, 3071] so it fits 12-bit storage.

Truth (see :meth:`Phantom.truth`): each voxel has exactly one label. "Right Lung"/"Left Lung"
are lung parenchyma only: they EXCLUDE nodules, vessels and airways and INCLUDE emphysematous
parenchyma of their side ("Emphysema" is both sides' emphysema). "Body" is everything inside the
skin (lungs, airways, gas, bone, vessels and nodules included; table and outside air excluded).
"""

from __future__ import annotations

import hashlib
import itertools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from models.base import Volume

# Voxel labels of Phantom.labels, in painting order (a later structure overwrites an earlier one).
AIR, FAT, SOFT, RIGHT_LUNG, LEFT_LUNG, AIRWAY, GAS, BONE, TABLE, NODULE = range(10)
VESSEL, RIGHT_EMPHYSEMA, LEFT_EMPHYSEMA = 10, 11, 12  # only present when asked for
MARROW, CANAL = 13, 14  # cancellous bone and spinal canal: only with ``marrow=True``
LABEL_HU: dict[int, float] = {
    AIR: -1000.0,
    FAT: -100.0,
    SOFT: 40.0,
    RIGHT_LUNG: -850.0,
    LEFT_LUNG: -850.0,
    AIRWAY: -1000.0,
    GAS: -1000.0,
    BONE: 700.0,
    TABLE: 400.0,
    NODULE: 45.0,
    VESSEL: 40.0,
    RIGHT_EMPHYSEMA: -980.0,
    LEFT_EMPHYSEMA: -980.0,
    MARROW: 170.0,  # plus a +-40 HU texture (trabeculae)
    CANAL: 15.0,
}
TRUTH_LABELS: dict[str, tuple[int, ...]] = {
    "Body": (
        *(FAT, SOFT, RIGHT_LUNG, LEFT_LUNG, AIRWAY, GAS, BONE, NODULE, VESSEL),
        *(RIGHT_EMPHYSEMA, LEFT_EMPHYSEMA, MARROW, CANAL),
    ),
    "Right Lung": (RIGHT_LUNG, RIGHT_EMPHYSEMA),
    "Left Lung": (LEFT_LUNG, LEFT_EMPHYSEMA),
    "Bone": (BONE, MARROW),
    "Marrow": (MARROW,),
    "Spinal Canal": (CANAL,),
    "Airway": (AIRWAY,),
    "Gas": (GAS,),
    "Table": (TABLE,),
    "Nodules": (NODULE,),
    "Vessels": (VESSEL,),
    "Emphysema": (RIGHT_EMPHYSEMA, LEFT_EMPHYSEMA),
    "Right Emphysema": (RIGHT_EMPHYSEMA,),
    "Left Emphysema": (LEFT_EMPHYSEMA,),
}
HU_MIN, HU_MAX = -1024, 3071


@dataclass(frozen=True)
class Nodule:
    """A solid spherical nodule (45 HU): centre in LPS mm, diameter in mm, in the ``side`` lung."""

    center_lps: tuple[float, float, float]
    diameter_mm: float
    side: str  # "Right" or "Left" (patient side)


@dataclass(frozen=True)
class Phantom:
    """A synthetic CT volume (``hu``, int16, (k, j, i)) with its geometry and voxel labels."""

    hu: npt.NDArray[np.int16]
    labels: npt.NDArray[np.uint8]
    pixel_mm: float
    slice_mm: float
    origin_lps: tuple[float, float, float]
    nodules: tuple[Nodule, ...]
    seed: int

    @property
    def shape(self) -> tuple[int, int, int]:
        k, j, i = self.hu.shape
        return int(k), int(j), int(i)

    @property
    def affine(self) -> npt.NDArray[np.float64]:
        """(i, j, k, 1) -> LPS mm, axis-aligned, k along +z."""
        a = np.diag([self.pixel_mm, self.pixel_mm, self.slice_mm, 1.0])
        a[:3, 3] = self.origin_lps
        return a

    def truth(self, name: str) -> npt.NDArray[np.bool_]:
        """Boolean truth mask (k, j, i) of ``name`` (a key of :data:`TRUTH_LABELS`)."""
        try:
            labels = TRUTH_LABELS[name]
        except KeyError:
            raise KeyError(f"no truth {name!r}; known: {sorted(TRUTH_LABELS)}") from None
        return np.isin(self.labels, labels)

    def to_volume(self, modality: str = "CT") -> Volume:
        """The phantom as a :class:`Volume` (float32 HU; deterministic placeholder UIDs)."""
        n = self.shape[0]
        return Volume(
            voxels=self.hu.astype(np.float32),
            affine=self.affine,
            modality=modality,
            sop_instance_uids=tuple(phantom_uid(self.seed, "sop", str(k)) for k in range(n)),
            frame_of_reference_uid=phantom_uid(self.seed, "for"),
        )


def phantom_uid(seed: int | str, *parts: str) -> str:
    """A deterministic ``2.25.<uuid-as-int>`` UID from ``seed`` and ``parts`` (same input, same UID)."""
    digest = hashlib.sha256("|".join(("phantom", str(seed), *parts)).encode()).digest()
    return "2.25." + str(uuid.UUID(bytes=digest[:16], version=4).int)


def make_ct_phantom(
    n_slices: int = 60,
    rows: int = 256,
    cols: int = 256,
    pixel_mm: float = 1.2,
    slice_mm: float = 2.5,
    seed: int = 0,
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    nodules: int | Sequence[Nodule] = 3,
    *,
    noise_hu: float = 15.0,
    blur_mm: float = 0.7,
    stomach_gas: bool = True,
    airways: bool = True,
    table_gap_mm: float = 10.0,
    vessels: int = 0,
    emphysema: float = 0.0,
    emphysema_patch_mm: float = 3.0,
    rotation_deg: float = 0.0,
    noise_seed: int | None = None,
    marrow: bool = False,
) -> Phantom:
    """Build a deterministic chest CT phantom (same arguments, same voxels).

    Args:
        n_slices, rows, cols: array shape (k, j, i).
        pixel_mm, slice_mm: in-plane and slice spacing.
        seed: seeds nodule placement and noise.
        shift_mm: LPS offset of the anatomy from the centre of the field of view.
        nodules: how many random nodules (4-20 mm, inside the lungs), or explicit ones (painted
            as given, after everything else: the caller keeps them inside a lung).
        noise_hu: standard deviation of the Gaussian noise.
        blur_mm: in-plane Gaussian blur (sigma, mm) before the noise: partial volume at edges.
        stomach_gas: add a gas bubble below the left lung when there is room for it.
        airways: add trachea and main bronchi (which connect the two lungs).
        table_gap_mm: air between the body's back and the 5 mm table (0: the table touches it).
        vessels: vessel trees per lung (0: none). Each is a binary tree of tubes (3 generations,
            radius about 3 mm at the root, the last one tapering to 0.5 mm) growing from the
            hilum, painted over lung only.
            Random nodules then keep clear of the vessels.
        emphysema: fraction in [0, 1) of the lung parenchyma (both lungs, voxels) turned into
            -980 HU emphysema; the patches are the top quantile of smoothed random noise.
        emphysema_patch_mm: smoothing (sigma, mm) of that noise: the patches' size.
        rotation_deg: rotation of the whole scene (table included) about the z axis through the
            anatomy centre ``shift_mm``, counter-clockwise from +x towards +y. The point at
            offset ``r`` from the centre before rotation ends at ``R(rotation_deg) @ r``;
            ``Phantom.nodules`` gives the rotated centres.
        noise_seed: seeds the noise separately (None: drawn from ``seed`` like everything else).
        marrow: bones with a 2 mm cortex (700 HU) around cancellous bone (170 HU +- 40 HU
            texture): a vertebra (body, neural arch around a 15 HU spinal canal that is not
            bone, spinous process; on 10 of every 30 mm a 4 mm soft-tissue gap in the body's
            posterior wall, the basivertebral foramen, joins marrow and canal) and ribs with a
            marrow core. Off: the spine is a solid disk and the ribs solid slabs.
    """
    if min(n_slices, rows, cols) < 1 or pixel_mm <= 0 or slice_mm <= 0:
        raise ValueError("shape and spacings must be positive")
    if not 0.0 <= emphysema < 1.0 or vessels < 0:
        raise ValueError("emphysema must be in [0, 1) and vessels >= 0")
    rng = np.random.default_rng(seed)
    origin = (-(cols - 1) / 2 * pixel_mm, -(rows - 1) / 2 * pixel_mm, -(n_slices - 1) / 2 * slice_mm)
    cx, cy, cz = (float(v) for v in shift_mm)
    # 1-D coordinates relative to the anatomy centre (mm).
    x = (origin[0] + np.arange(cols) * pixel_mm - cx).astype(np.float32)[None, :]
    y = (origin[1] + np.arange(rows) * pixel_mm - cy).astype(np.float32)[:, None]
    z = (origin[2] + np.arange(n_slices) * slice_mm - cz).astype(np.float32)
    size = min(rows, cols) * pixel_mm
    length = n_slices * slice_mm
    ax, ay = 0.40 * size, 0.28 * size  # body semi-axes

    labels = np.zeros((n_slices, rows, cols), dtype=np.uint8)
    r_body = np.sqrt((x / ax) ** 2 + (y / ay) ** 2)  # elliptic radius, (rows, cols)
    fat_frac = 1.0 - 0.04 * size / ay
    labels[:, r_body < 1.0] = FAT
    labels[:, r_body < fat_frac] = SOFT

    # Lungs: ellipsoids, upper part of the volume (may be cut by the top slice).
    lung_a, lung_b, lung_c = 0.33 * ax, 0.62 * ay, 0.40 * length
    lung_x, lung_z = 0.47 * ax, 0.15 * length
    qz = ((z - lung_z) / lung_c) ** 2
    for side, label in ((-1.0, RIGHT_LUNG), (1.0, LEFT_LUNG)):
        q2 = ((x - side * lung_x) / lung_a) ** 2 + (y / lung_b) ** 2
        labels[q2[None, :, :] + qz[:, None, None] < 1.0] = label

    tubes = _airway_tubes(ax, ay, size, length) if airways else []
    for p0, p1, radius in tubes:
        _paint_tube(labels, x, y, z, p0, p1, radius, AIRWAY)

    if stomach_gas:
        g_a, g_b, g_c = 0.22 * ax, 0.25 * ay, min(20.0, 0.1 * length)
        g_z = lung_z - lung_c - g_c - 5.0
        if g_z - g_c > z[0]:
            q = ((x - 0.35 * ax) / g_a) ** 2 + ((y + 0.3 * ay) / g_b) ** 2
            labels[q[None, :, :] + (((z - g_z) / g_c) ** 2)[:, None, None] < 1.0] = GAS

    # Bone: vertebral body + spinous process, sternum, rib slabs (ring inside the body wall).
    spine_r, spine_y = 0.05 * size, 0.62 * ay
    spine = (x**2 + (y - spine_y) ** 2 < spine_r**2) | ((np.abs(x) < 0.012 * size) & (y > spine_y) & (y < 0.88 * ay))
    sternum = (np.abs(x) < 0.025 * size) & (y > -0.9 * ay) & (y < -0.8 * ay)
    ring = (r_body > 0.86) & (r_body < 0.86 + 0.02 * size / ay) & ~((np.abs(x) < 0.25 * ax) & (y < 0))
    ribs_z = np.mod(z - origin[2], 25.0) < 12.0  # z is anatomy-relative: ribs follow shift_mm
    labels[:, sternum if marrow else spine | sternum] = BONE
    labels[ribs_z[:, None, None] & ring[None, :, :]] = BONE
    if marrow:
        _paint_marrow_bones(labels, x, y, np.mod(z - origin[2], 25.0), np.mod(z - origin[2], 30.0), (ax, ay, size))

    # Table: a 5 mm plate curved less than the body's back, ``table_gap_mm`` below it at the
    # midline (the gap widens sideways); painted only where it is outside the body.
    half_width, thick = 0.85 * ax, 5.0
    y_top = ay + table_gap_mm - 0.2 * ay * (x / half_width) ** 2
    table = (y >= y_top) & (y < y_top + thick) & (np.abs(x) <= half_width) & (r_body >= 1.0)
    labels[:, table] = TABLE

    lung_geo = (lung_a, lung_b, lung_c, lung_x, lung_z)
    keep_clear = list(tubes)
    if vessels:
        vessel_tubes = _vessel_trees(np.random.default_rng([seed, 1]), vessels, lung_geo)
        for p0, p1, radius in vessel_tubes:
            _paint_tube(labels, x, y, z, p0, p1, radius, VESSEL, only=(RIGHT_LUNG, LEFT_LUNG))
        keep_clear += vessel_tubes
    if emphysema > 0:
        _paint_emphysema(labels, np.random.default_rng([seed, 2]), emphysema, emphysema_patch_mm, pixel_mm, slice_mm)

    # Nodules, inside the lungs.
    if isinstance(nodules, int):
        placed = _random_nodules(rng, nodules, lung_geo, (cx, cy, cz), float(z[-1]), keep_clear)
    else:
        placed = tuple(nodules)
    for nod in placed:
        rel = np.asarray(nod.center_lps, dtype=np.float64) - np.array([cx, cy, cz])
        _paint_tube(labels, x, y, z, rel, rel, nod.diameter_mm / 2, NODULE)  # a ball

    if rotation_deg:
        labels, placed = _rotate_scene(labels, placed, rotation_deg, origin, pixel_mm, (cx, cy))

    # Intensities: per-label HU + noise, slice by slice to keep memory low.
    lut = np.zeros(256, dtype=np.float32)
    for lab, hu_value in LABEL_HU.items():
        lut[lab] = hu_value
    hu = np.empty(labels.shape, dtype=np.int16)
    sigma = blur_mm / pixel_mm
    noise_rng = rng if noise_seed is None else np.random.default_rng(noise_seed)
    texture_rng = np.random.default_rng([seed, 3])
    for k in range(n_slices):
        sl = lut[labels[k]]
        if marrow:
            sl += np.where(labels[k] == MARROW, _texture(texture_rng, (rows, cols), 1.0 / pixel_mm, 40.0), 0.0)
        if sigma > 0:
            sl = ndi.gaussian_filter(sl, sigma, mode="nearest", truncate=3.0)
        sl += noise_rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(noise_hu)
        hu[k] = np.clip(np.rint(sl), HU_MIN, HU_MAX).astype(np.int16)
    return Phantom(
        hu=hu,
        labels=labels,
        pixel_mm=float(pixel_mm),
        slice_mm=float(slice_mm),
        origin_lps=(float(origin[0]), float(origin[1]), float(origin[2])),
        nodules=placed,
        seed=seed,
    )


_Tube = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float]


def _paint_marrow_bones(
    labels: npt.NDArray[np.uint8],
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.float32],
    rib_phase: npt.NDArray[np.float32],
    vertebra_phase: npt.NDArray[np.float32],
    axes: tuple[float, float, float],
) -> None:
    """The vertebra (cortex, marrow, arch, canal, foramen) and the ribs' marrow core (in place).

    ``rib_phase``/``vertebra_phase``: z (mm) modulo the rib (25 mm) and foramen (30 mm) periods.
    """
    ax, ay, size = axes
    cortex = 2.0
    # Ribs: the ring of the plain phantom keeps a 2 mm cortex on every side (ends and z faces).
    r_body = np.sqrt((x / ax) ** 2 + (y / ay) ** 2)
    c = cortex / ay
    core = (r_body > 0.86 + c) & (r_body < 0.86 + 0.02 * size / ay - c)
    core &= ~((np.abs(x) < 0.25 * ax + cortex) & (y < cortex))
    ks = (rib_phase >= cortex) & (rib_phase < 12.0 - cortex)
    cj, ci = np.nonzero(np.broadcast_to(core, labels.shape[1:]))
    labels[np.flatnonzero(ks)[:, None], cj, ci] = MARROW
    # The vertebra, painted over the ribs' marrow where the rib ring passes behind it.
    r = 0.05 * size
    a, b, y_body = r, 0.7 * r, 0.62 * ay - 0.5 * r
    r_canal, arch = 0.46 * r, 2.5
    y_canal = y_body + b + r_canal
    outer = (x / a) ** 2 + ((y - y_body) / b) ** 2 < 1.0
    inner = (x / (a - cortex)) ** 2 + ((y - y_body) / (b - cortex)) ** 2 < 1.0
    d_canal = np.sqrt(x**2 + (y - y_canal) ** 2)
    spinous = (np.abs(x) < 0.012 * size) & (y > y_canal) & (y < 0.92 * ay)
    labels[:, outer | (d_canal < r_canal + arch) | spinous] = BONE
    labels[:, inner] = MARROW
    labels[:, d_canal < r_canal] = CANAL
    foramen = (np.abs(x) < 2.0) & (y > y_body) & outer & ~inner
    fj, fi = np.nonzero(np.broadcast_to(foramen, labels.shape[1:]))
    labels[np.flatnonzero(vertebra_phase < 10.0)[:, None], fj, fi] = SOFT


def _texture(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float, std: float) -> npt.NDArray[np.float32]:
    """Smooth random texture with standard deviation ``std`` (trabecular bone)."""
    field = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_px)
    return (field * np.float32(std / max(float(field.std()), 1e-6))).astype(np.float32)


def _airway_tubes(ax: float, ay: float, size: float, length: float) -> list[_Tube]:
    """Trachea (from above the volume down to the carina) and the two main bronchi, relative mm."""
    carina = np.array([0.0, -0.15 * ay, 0.35 * length])
    tubes: list[_Tube] = [(carina, carina + np.array([0.0, 0.0, length]), 0.03 * size)]
    for side in (-1.0, 1.0):
        tubes.append((carina, carina + np.array([side * 0.35 * ax, 0.0, -0.08 * length]), 0.02 * size))
    return tubes


def _segment_distance(p: npt.NDArray[np.float64], p0: npt.NDArray[np.float64], p1: npt.NDArray[np.float64]) -> float:
    """Distance from point ``p`` to the segment p0-p1."""
    d = p1 - p0
    t = float(np.clip((p - p0) @ d / float(d @ d), 0.0, 1.0))
    return float(np.linalg.norm(p - p0 - t * d))


def _paint_tube(
    labels: npt.NDArray[np.uint8],
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.float32],
    z: npt.NDArray[np.float32],
    p0: npt.NDArray[np.float64],
    p1: npt.NDArray[np.float64],
    radius: float,
    label: int,
    only: tuple[int, ...] | None = None,
) -> None:
    """Set ``label`` on voxels within ``radius`` of the segment p0-p1 (a ball if p0 == p1).

    With ``only``, just the voxels currently labelled one of ``only`` are changed.
    """
    lo, hi = np.minimum(p0, p1) - radius, np.maximum(p0, p1) + radius
    ks = np.nonzero((z >= lo[2]) & (z <= hi[2]))[0]
    js = np.nonzero((y[:, 0] >= lo[1]) & (y[:, 0] <= hi[1]))[0]
    is_ = np.nonzero((x[0] >= lo[0]) & (x[0] <= hi[0]))[0]
    if not (ks.size and js.size and is_.size):
        return
    zz = z[ks][:, None, None]
    yy = y[js, 0][None, :, None]
    xx = x[0, is_][None, None, :]
    d = p1 - p0
    t = ((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1] + (zz - p0[2]) * d[2]) / max(float(d @ d), 1e-12)
    t = np.clip(t, 0.0, 1.0)
    dist2 = (xx - p0[0] - t * d[0]) ** 2 + (yy - p0[1] - t * d[1]) ** 2 + (zz - p0[2] - t * d[2]) ** 2
    box = labels[ks[0] : ks[-1] + 1, js[0] : js[-1] + 1, is_[0] : is_[-1] + 1]
    inside = dist2 <= radius**2
    if only is not None:
        inside &= np.isin(box, only)
    box[inside] = label


def _random_nodules(
    rng: np.random.Generator,
    count: int,
    lung_geo: tuple[float, float, float, float, float],
    center: tuple[float, float, float],
    z_top: float,
    airway_tubes: Sequence[_Tube],
) -> tuple[Nodule, ...]:
    """Place ``count`` non-overlapping nodules well inside the lung ellipsoids and the volume."""
    lung_a, lung_b, lung_c, lung_x, lung_z = lung_geo
    margin = 3.0
    out: list[Nodule] = []
    for _ in range(count * 200):
        if len(out) == count:
            break
        diameter = float(rng.uniform(4.0, 20.0))
        side = -1.0 if rng.random() < 0.5 else 1.0
        r = diameter / 2 + margin
        semi = np.array([lung_a - r, lung_b - r, lung_c - r])
        if np.any(semi <= 0):
            continue
        u = rng.uniform(-1.0, 1.0, 3)
        if u @ u > 1.0:
            continue
        rel = np.array([side * lung_x, 0.0, lung_z]) + u * semi
        if rel[2] + r > z_top:  # keep it inside the scanned volume
            continue
        if any(_segment_distance(rel, p0, p1) < rad + r for p0, p1, rad in airway_tubes):
            continue  # keep clear of the trachea and bronchi
        if any(np.linalg.norm(rel + center - np.asarray(o.center_lps)) < r + o.diameter_mm / 2 + margin for o in out):
            continue
        pos = (float(rel[0] + center[0]), float(rel[1] + center[1]), float(rel[2] + center[2]))
        out.append(Nodule(center_lps=pos, diameter_mm=diameter, side="Right" if side < 0 else "Left"))
    return tuple(out)


def _vessel_trees(
    rng: np.random.Generator, per_lung: int, lung_geo: tuple[float, float, float, float, float]
) -> list[_Tube]:
    """Branching vessel trees (relative mm) growing outwards from each lung's hilum."""
    lung_a, lung_b, lung_c, lung_x, lung_z = lung_geo
    scale = float(np.cbrt(lung_a * lung_b * lung_c))
    tubes: list[_Tube] = []
    for side in (-1.0, 1.0):
        hilum = np.array([side * (lung_x - 0.9 * lung_a), 0.0, lung_z + 0.1 * lung_c])
        for _ in range(per_lung):
            d = rng.standard_normal(3)
            d[0] = side * abs(d[0])
            stack = [(hilum, d / np.linalg.norm(d), 0.5 * scale, min(3.0, 0.07 * scale), 0)]
            while stack:
                start, direction, length, radius, gen = stack.pop()
                end = start + direction * length
                if gen == 2:  # the last generation tapers to 0.5 mm (no blob-like end cap)
                    steps = np.linspace(0.0, 1.0, 6)
                    for t0, t1 in itertools.pairwise(steps):
                        r = radius + (0.5 - radius) * t1
                        tubes.append((start + (end - start) * t0, start + (end - start) * t1, r))
                    continue
                tubes.append((start, end, radius))
                for sign in (-1.0, 1.0):
                    perp = np.cross(direction, rng.standard_normal(3))
                    perp /= np.linalg.norm(perp)
                    angle = np.deg2rad(rng.uniform(25.0, 45.0))
                    child = np.cos(angle) * direction + sign * np.sin(angle) * perp
                    stack.append((end, child / np.linalg.norm(child), 0.75 * length, 0.75 * radius, gen + 1))
    return tubes


def _paint_emphysema(
    labels: npt.NDArray[np.uint8],
    rng: np.random.Generator,
    fraction: float,
    patch_mm: float,
    pixel_mm: float,
    slice_mm: float,
) -> None:
    """Relabel ``fraction`` of the lung parenchyma voxels as emphysema of the same side (in place)."""
    lung = (labels == RIGHT_LUNG) | (labels == LEFT_LUNG)
    boxes = ndi.find_objects(lung.astype(np.uint8))
    if not boxes or boxes[0] is None:
        return
    box = boxes[0]
    sub = labels[box]
    in_lung = lung[box]
    noise = rng.standard_normal(sub.shape, dtype=np.float32)
    field = ndi.gaussian_filter(noise, (patch_mm / slice_mm, patch_mm / pixel_mm, patch_mm / pixel_mm))
    threshold = np.quantile(field[in_lung], 1.0 - fraction)
    chosen = in_lung & (field > threshold)
    sub[chosen & (sub == RIGHT_LUNG)] = RIGHT_EMPHYSEMA
    sub[chosen & (sub == LEFT_LUNG)] = LEFT_EMPHYSEMA


def _rotate_scene(
    labels: npt.NDArray[np.uint8],
    nodules: tuple[Nodule, ...],
    angle_deg: float,
    origin: tuple[float, float, float],
    pixel_mm: float,
    centre_xy: tuple[float, float],
) -> tuple[npt.NDArray[np.uint8], tuple[Nodule, ...]]:
    """Rotate labels (nearest neighbour) and nodule centres by ``angle_deg`` about z through ``centre_xy``."""
    c, s = np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))
    ic = (centre_xy[0] - origin[0]) / pixel_mm
    jc = (centre_xy[1] - origin[1]) / pixel_mm
    # Output (k, j, i) -> input (k, j', i'): the input is the output rotated back by -angle.
    matrix = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    centre = np.array([0.0, jc, ic])
    rotated = ndi.affine_transform(labels, matrix, offset=centre - matrix @ centre, order=0, mode="constant", cval=AIR)
    moved = []
    for nod in nodules:
        dx, dy = nod.center_lps[0] - centre_xy[0], nod.center_lps[1] - centre_xy[1]
        pos = (float(centre_xy[0] + c * dx - s * dy), float(centre_xy[1] + s * dx + c * dy), nod.center_lps[2])
        moved.append(Nodule(center_lps=pos, diameter_mm=nod.diameter_mm, side=nod.side))
    return rotated.astype(np.uint8, copy=False), tuple(moved)
