"""Synthetic cases for training and evaluating the demonstration networks (numpy/scipy only).

Everything here builds on :func:`testkit.phantom.make_ct_phantom`; none of it is real anatomy.

* :func:`random_phantom`: a chest phantom with a random field of view, resolution, offset, noise
  and number of nodules (``rng`` decides everything, so a seed gives the same case).
* :func:`emphysema_case`: a phantom with the generator's emphysema (-980 HU patches) over a
  chosen fraction of the lung parenchyma. The grade is defined on that fraction, which is the
  low-attenuation area below -950 HU (LAA-950) up to noise; grades as ``ct-emphysema``.
* :func:`rigid_pair`: the same anatomy scanned twice (different noise, resolution and nodule
  growth), the prior moved by a known rigid transform expressed in its affine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from models.base import Volume
from models.ct_emphysema import GRADES, grade
from testkit.phantom import BONE, LEFT_LUNG, RIGHT_LUNG, Nodule, Phantom, make_ct_phantom, phantom_uid

# Grades as in ``ct-emphysema`` (models.ct_emphysema.grade): LAA below 5 % none, 5-15 % mild,
# 15-25 % moderate, 25 % or more severe. Training and evaluation draw the emphysema fraction of
# each grade from these ranges, one point away from the cut-offs.
GRADE_FRACTION_RANGES: tuple[tuple[float, float], ...] = ((0.0, 0.04), (0.06, 0.14), (0.16, 0.24), (0.26, 0.50))


def emphysema_grade(fraction: float) -> int:
    """Index into :data:`models.ct_emphysema.GRADES` for an emphysema fraction of the lung (0-1)."""
    return GRADES.index(grade(100.0 * fraction))


def random_phantom_args(
    rng: np.random.Generator,
    *,
    pixel_mm: tuple[float, float] = (1.2, 2.4),
    slice_mm: tuple[float, float] = (2.0, 5.0),
    fov_mm: tuple[float, float] = (300.0, 450.0),
    length_mm: tuple[float, float] = (180.0, 320.0),
    nodules: tuple[int, int] = (0, 6),
    vessels: tuple[int, int] = (0, 3),
    shift_mm: float = 25.0,
) -> dict[str, Any]:
    """Keyword arguments of :func:`make_ct_phantom` for a random case (deterministic for ``rng``)."""
    px = float(rng.uniform(*pixel_mm))
    sl = float(rng.uniform(*slice_mm))
    n = max(32, round(float(rng.uniform(*fov_mm)) / px))
    k = max(8, round(float(rng.uniform(*length_mm)) / sl))
    return {
        "n_slices": k,
        "rows": n,
        "cols": n,
        "pixel_mm": px,
        "slice_mm": sl,
        "seed": int(rng.integers(0, 2**31)),
        "shift_mm": (float(rng.uniform(-shift_mm, shift_mm)), float(rng.uniform(-shift_mm, shift_mm)), 0.0),
        "nodules": int(rng.integers(nodules[0], nodules[1] + 1)),
        "noise_hu": float(rng.uniform(8.0, 25.0)),
        "blur_mm": float(rng.uniform(0.4, 1.0)),
        "stomach_gas": bool(rng.random() < 0.7),
        "airways": bool(rng.random() < 0.9),
        "table_gap_mm": float(rng.choice([0.0, 5.0, 10.0, 20.0])),
        "vessels": int(rng.integers(vessels[0], vessels[1] + 1)),
    }


def random_phantom(rng: np.random.Generator, **ranges: Any) -> Phantom:
    """A phantom with random geometry, noise and content (see :func:`random_phantom_args`)."""
    return make_ct_phantom(**random_phantom_args(rng, **ranges))


@dataclass(frozen=True)
class EmphysemaCase:
    """A phantom with emphysema of a known grade (``fraction``: LAA of the lung parenchyma)."""

    phantom: Phantom
    fraction: float
    grade: int


def emphysema_case(rng: np.random.Generator, grade_index: int | None = None, **ranges: Any) -> EmphysemaCase:
    """A random phantom whose emphysema fraction lies in grade ``grade_index``'s range (random if None)."""
    g = int(rng.integers(0, len(GRADES))) if grade_index is None else grade_index
    lo, hi = GRADE_FRACTION_RANGES[g]
    fraction = 0.0 if g == 0 and rng.random() < 0.4 else float(rng.uniform(lo, hi))
    args = random_phantom_args(rng, **ranges)
    args["emphysema"] = fraction
    args["emphysema_patch_mm"] = float(rng.uniform(2.0, 5.0))
    phantom = make_ct_phantom(**args)
    return EmphysemaCase(phantom, laa_fraction(phantom), emphysema_grade(laa_fraction(phantom)))


def laa_fraction(phantom: Phantom) -> float:
    """Emphysema voxels / lung voxels (both lungs, emphysema included) of the phantom's truth."""
    lungs = int(phantom.truth("Right Lung").sum() + phantom.truth("Left Lung").sum())
    return float(phantom.truth("Emphysema").sum()) / max(1, lungs)


def rotation_matrix(angles_deg: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Rotation about x, then y, then z (degrees): ``Rz @ Ry @ Rx``."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid_matrix(
    angles_deg: npt.ArrayLike, translation_mm: npt.ArrayLike, center: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """4x4 rigid transform: rotate by ``angles_deg`` about ``center``, then translate."""
    r = rotation_matrix(angles_deg)
    c = np.asarray(center, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c - r @ c + np.asarray(translation_mm, dtype=np.float64)
    return m


@dataclass(frozen=True)
class RigidPair:
    """A current and a prior scan of the same phantom anatomy.

    ``current_phantom`` is the current scan's phantom (truth labels).
    ``current_to_prior`` (4x4) maps a current LPS point to the prior LPS point of the same anatomy
    (the direction of :attr:`models.base.Registration.transform`).
    ``landmarks_current`` are anatomical points (nodule centres, lung and spine centres), current LPS.
    """

    current: Volume
    prior: Volume
    current_phantom: Phantom
    current_to_prior: npt.NDArray[np.float64]
    landmarks_current: npt.NDArray[np.float64]


def rigid_pair(
    rng: np.random.Generator,
    *,
    max_angle_deg: tuple[float, float, float] = (4.0, 4.0, 10.0),
    max_shift_mm: float = 30.0,
    max_crop: float = 0.15,
    **ranges: Any,
) -> RigidPair:
    """A random current scan and a prior of the same anatomy moved by a random rigid transform.

    The prior has its own resolution, noise and table, and its nodules are 0-30 % smaller. The
    motion is put into the prior's affine (an oblique geometry), so no voxel is interpolated.
    Both scans then lose up to ``max_crop`` of their slices at each end, independently: a field
    of view that moved with the anatomy would tell a network the motion for free.
    """
    args = random_phantom_args(rng, **{"nodules": (1, 5), **ranges})
    current = crop_slices(make_ct_phantom(**args), rng, max_crop)
    # The phantom scales its anatomy with the field of view and the scan length, so the prior
    # keeps both (and the anatomy offset) and only changes the sampling.
    fov = args["rows"] * args["pixel_mm"]
    length = args["n_slices"] * args["slice_mm"]
    n = max(32, round(fov / float(rng.uniform(1.2, 2.4))))
    k = max(8, round(length / float(rng.uniform(2.0, 5.0))))
    prior_nodules = tuple(
        Nodule(nd.center_lps, nd.diameter_mm * float(rng.uniform(0.7, 1.0)), nd.side) for nd in current.nodules
    )
    prior = make_ct_phantom(
        k,
        n,
        n,
        pixel_mm=fov / n,
        slice_mm=length / k,
        seed=args["seed"],  # same vessel trees
        noise_seed=int(rng.integers(0, 2**31)),
        shift_mm=args["shift_mm"],
        nodules=prior_nodules,
        vessels=args["vessels"],
        noise_hu=float(rng.uniform(8.0, 25.0)),
        stomach_gas=args["stomach_gas"],
        airways=args["airways"],
        table_gap_mm=float(rng.choice([0.0, 5.0, 10.0, 20.0])),
    )
    prior = crop_slices(prior, rng, max_crop)
    angles = rng.uniform(-1, 1, 3) * np.asarray(max_angle_deg)
    trans = rng.uniform(-1, 1, 3) * max_shift_mm
    # Anatomy at current LPS p lies at prior LPS motion @ p: the prior's affine is moved by it.
    motion = rigid_matrix(angles, trans, np.asarray(args["shift_mm"], dtype=np.float64))
    pv = prior.to_volume()
    prior_volume = Volume(pv.voxels, motion @ pv.affine, "CT", pv.sop_instance_uids, phantom_uid(prior.seed, "prior"))
    landmarks = [np.asarray(nd.center_lps) for nd in current.nodules]
    for label in (RIGHT_LUNG, LEFT_LUNG, BONE):
        kji = np.argwhere(current.labels == label)
        if len(kji):
            landmarks.append(current.affine[:3, :3] @ kji.mean(axis=0)[::-1] + current.affine[:3, 3])
    return RigidPair(current.to_volume(), prior_volume, current, motion, np.asarray(landmarks))


def crop_slices(phantom: Phantom, rng: np.random.Generator, max_fraction: float) -> Phantom:
    """``phantom`` without up to ``max_fraction`` of its slices at each end (random; nodules outside dropped)."""
    n = phantom.shape[0]
    lo = int(rng.integers(0, int(max_fraction * n) + 1))
    hi = n - int(rng.integers(0, int(max_fraction * n) + 1))
    if hi - lo < 3:
        return phantom
    x, y, z = phantom.origin_lps
    z0 = z + lo * phantom.slice_mm
    z1 = z + (hi - 1) * phantom.slice_mm
    return dataclasses.replace(
        phantom,
        hu=phantom.hu[lo:hi].copy(),
        labels=phantom.labels[lo:hi].copy(),
        origin_lps=(x, y, z0),
        nodules=tuple(nd for nd in phantom.nodules if z0 <= nd.center_lps[2] <= z1),
    )
