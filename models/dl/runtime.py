"""Device, precision, orientation and resampling shared by the deep-learning models.

Canonical orientation: the networks see arrays ``c[z, y, x]`` whose axes run along LPS +z (feet
-> head), +y (front -> back) and +x (patient right -> left), the layout of
:mod:`testkit.phantom`. :class:`Orientation` turns any volume array into that layout by
transposing and flipping (views, no copies) and back again; for oblique affines the nearest axes
are used, so only world-coordinate computations (sides, detections) use the exact affine.

Working grid: a canonical array of shape ``N`` and spacing ``s`` is resampled to
``M = round(N * s / t)`` voxels for a target spacing ``t``. Both grids cover the same extent
(voxel edges at ``-0.5`` and ``N - 0.5``), so working voxel ``w`` sits at canonical index
``(w + 0.5) * N / M - 0.5`` (the ``align_corners=False`` convention of ``torch.nn.functional``).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from models.errors import ModelOptionsError

Precision = Literal["fp32", "amp"]
G = TypeVar("G", bound=np.generic)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else ``cuda`` when available, else ``cpu``.

    Raises ``ValueError`` when ``device`` asks for CUDA and this process sees no CUDA device
    (rather than failing later, deep inside a forward pass).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelOptionsError(f"device {str(dev)!r} requested but no CUDA device is available to this process")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ModelOptionsError(f"device {str(dev)!r} requested but only {count} CUDA device(s)")
    return dev


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[object]:
    """Mixed precision for ``amp`` (float16 on CUDA, bfloat16 on CPU); a no-op for ``fp32``."""
    if precision not in ("fp32", "amp"):
        raise ModelOptionsError(f"precision must be 'fp32' or 'amp', got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class Orientation:
    """How a volume array maps onto the canonical (z, y, x) layout.

    ``perm[c]`` is the array axis that becomes canonical axis ``c``; ``flip[c]`` says whether
    that canonical axis is reversed. ``affine`` is the source (i, j, k, 1) -> LPS matrix.
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    affine: npt.NDArray[np.float64]

    @classmethod
    def of(cls, affine: npt.NDArray[np.float64]) -> Orientation:
        """The nearest canonical axes for ``affine`` (best permutation of |direction cosines|)."""
        cols = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
        # array axis a <-> affine column 2 - a; canonical axis c <-> world axis 2 - c
        best: tuple[int, int, int] = (0, 1, 2)
        best_score = -1.0
        for p in itertools.permutations(range(3)):
            score = sum(abs(cols[2 - c, 2 - p[c]]) for c in range(3))
            if score > best_score + 1e-9:
                best, best_score = (p[0], p[1], p[2]), score
        flip = tuple(bool(cols[2 - c, 2 - best[c]] < 0) for c in range(3))
        return cls(best, (flip[0], flip[1], flip[2]), affine.astype(np.float64))

    def to_canonical(self, array: npt.NDArray[G]) -> npt.NDArray[G]:
        """A canonical view of ``array`` (shape (k, j, i) of the source volume)."""
        out = np.transpose(array, self.perm)
        axes = tuple(c for c in range(3) if self.flip[c])
        return np.flip(out, axis=axes) if axes else out

    def from_canonical(self, array: npt.NDArray[G]) -> npt.NDArray[G]:
        """The inverse of :meth:`to_canonical` (a view)."""
        axes = tuple(c for c in range(3) if self.flip[c])
        out = np.flip(array, axis=axes) if axes else array
        return np.transpose(out, np.argsort(self.perm))

    def canonical_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        return int(shape[self.perm[0]]), int(shape[self.perm[1]]), int(shape[self.perm[2]])

    def canonical_spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along the canonical axes (z, y, x)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)  # i, j, k
        z, y, x = (float(norms[2 - self.perm[c]]) for c in range(3))
        return z, y, x

    def canonical_affine(self, shape: Sequence[int]) -> npt.NDArray[np.float64]:
        """(x', y', z', 1) canonical index (reversed axis order, like i, j, k) -> LPS mm.

        ``shape`` is the source array shape (k, j, i).
        """
        # canonical index (c0, c1, c2) -> source array index (a0, a1, a2) -> (i, j, k)
        m = np.zeros((4, 4))
        m[3, 3] = 1.0
        for c in range(3):
            a = self.perm[c]
            src_col = 2 - a  # row of the source ijk vector for array axis a
            can_col = 2 - c  # canonical ijk-style index (x', y', z') column
            if self.flip[c]:
                m[src_col, can_col] = -1.0
                m[src_col, 3] = shape[a] - 1
            else:
                m[src_col, can_col] = 1.0
        return self.affine @ m


def tensor(arr: npt.ArrayLike, dtype: npt.DTypeLike = np.float32) -> torch.Tensor:
    """A CPU tensor of ``arr`` as ``dtype``, sharing its memory when it may: a read-only array (the
    worker hands models read-only volumes, shared by a study's jobs) is copied, so no torch operation
    can ever write into the input of the next job (and torch does not warn about it)."""
    a = np.ascontiguousarray(arr, dtype=dtype)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def work_shape(shape: Sequence[int], spacing: Sequence[float], target_mm: Sequence[float]) -> tuple[int, int, int]:
    """Working-grid shape for a grid of ``shape``/``spacing`` resampled to ``target_mm``."""
    out = [max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target_mm, strict=True)]
    return out[0], out[1], out[2]


def resample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample ``x`` (B, C, D, H, W) to ``size`` over the same extent.

    Shrinking axes are averaged (``area``, anti-aliased), growing axes interpolated linearly.
    """
    src = (int(x.shape[2]), int(x.shape[3]), int(x.shape[4]))
    dst = (int(size[0]), int(size[1]), int(size[2]))
    if src == dst:
        return x
    shrink = (min(src[0], dst[0]), min(src[1], dst[1]), min(src[2], dst[2]))
    if shrink != src:
        x = F.adaptive_avg_pool3d(x, shrink)
    if shrink != dst:
        x = F.interpolate(x, size=dst, mode="trilinear", align_corners=False)
    return x


def hu_to_unit(hu: torch.Tensor, window: Sequence[float]) -> torch.Tensor:
    """Clip HU to ``window`` = (lo, hi) and scale to [0, 1]."""
    lo, hi = float(window[0]), float(window[1])
    return (hu.clamp(lo, hi) - lo) / (hi - lo)


def to_work_grid(
    canonical: npt.NDArray[np.generic], spacing: Sequence[float], target_mm: Sequence[float], window: Sequence[float]
) -> torch.Tensor:
    """Canonical HU array -> (1, 1, *work_shape) float32 tensor in [0, 1] on the working grid (CPU)."""
    arr = np.asarray(canonical, dtype=np.float32)
    t = tensor(arr)[None, None]
    t = hu_to_unit(t, window)
    return resample(t, work_shape(arr.shape, spacing, target_mm)).contiguous()


def _axis_weights(n_out: int, n_src: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear interpolation from ``n_src`` to ``n_out`` samples (align_corners=False): lo, hi, w."""
    pos = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_src / n_out) - 0.5
    pos = pos.clamp(0, n_src - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n_src - 1)
    return lo, hi, (pos - lo).float()


def upsample_chunks(
    work: torch.Tensor, out_shape: Sequence[int], chunk: int = 16
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Linearly upsample ``work`` (C, m0, m1, m2) to ``out_shape`` a slab of axis 0 at a time.

    Yields ``(slab, values)`` with ``values`` of shape (C, slab length, out1, out2); memory stays
    at one slab whatever the output size.
    """
    c, m0 = int(work.shape[0]), int(work.shape[1])
    n0, n1, n2 = (int(v) for v in out_shape)
    lo, hi, w = _axis_weights(n0, m0)
    for start in range(0, n0, chunk):
        stop = min(n0, start + chunk)
        wk = w[start:stop].to(work.device, work.dtype)[None, :, None, None]
        slab = work[:, lo[start:stop]] * (1 - wk) + work[:, hi[start:stop]] * wk  # (C, s, m1, m2)
        slab = F.interpolate(slab.reshape(1, -1, *slab.shape[2:]), size=(n1, n2), mode="bilinear", align_corners=False)
        yield slice(start, stop), slab.reshape(c, stop - start, n1, n2)


def argmax_channels(values: torch.Tensor) -> torch.Tensor:
    """``values.argmax(dim=0)`` as uint8 for a few channels (C, ...): elementwise, much faster on CPU."""
    best = values[0].clone()
    out = torch.zeros(values.shape[1:], dtype=torch.uint8, device=values.device)
    for c in range(1, int(values.shape[0])):
        better = values[c] > best
        best = torch.where(better, values[c], best)
        out[better] = c
    return out


def work_axis_to_canonical(m: int, n: int) -> npt.NDArray[np.float64]:
    """Canonical index (fractional) of each of the ``m`` working voxels along an axis of ``n`` voxels."""
    return (np.arange(m, dtype=np.float64) + 0.5) * (n / m) - 0.5


def work_to_canonical_index(
    work_ijk: npt.NDArray[np.float64], canonical_shape: Sequence[int], work_shape_: Sequence[int]
) -> npt.NDArray[np.float64]:
    """Working-grid indices (..., 3) in (z, y, x) order -> canonical indices (same order)."""
    n = np.asarray(canonical_shape, dtype=np.float64)
    m = np.asarray(work_shape_, dtype=np.float64)
    return (np.asarray(work_ijk, dtype=np.float64) + 0.5) * (n / m) - 0.5
