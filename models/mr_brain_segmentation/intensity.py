"""Intensity tools without absolute thresholds: Otsu (two and three classes) and bias-field correction.

MR values have no absolute meaning (scanner gain, coil, sequence), so every threshold here comes
from the image's own histogram. Bias-field correction:

* ``n4``: SimpleITK's N4 (Tustison et al., IEEE TMI 2010;29:1310-1320) on a 2x shrunk image inside
  the head mask, when SimpleITK is installed (the ``ml`` extra);
* ``smooth``: numpy/SciPy only: the log image is split into three tissue classes (k-means), and the
  residual of each voxel from its class mean is smoothed by normalised convolution (Gaussian,
  ``field_mm``) into a log field; three rounds. Voxels of the darkest class (bone, air, noise) do
  not vote.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

BiasMethod = Literal["auto", "n4", "smooth", "none"]
FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


def otsu(values: npt.ArrayLike, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (between-class variance maximised over ``bins`` histogram bins)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("no values")
    hist, edges = np.histogram(v, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = m / w0
        mu1 = (m[-1] - m) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    between[~np.isfinite(between)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def otsu3(values: npt.ArrayLike, bins: int = 96) -> tuple[float, float]:
    """Two thresholds splitting ``values`` into three classes (multi-level Otsu, exhaustive)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    hist, edges = np.histogram(v, bins=bins)
    p = hist.astype(np.float64)
    c = (edges[:-1] + edges[1:]) / 2.0
    cw, cm = np.concatenate([[0.0], np.cumsum(p)]), np.concatenate([[0.0], np.cumsum(p * c)])
    best, pair = -1.0, (1, 2)
    for a in range(1, bins - 1):
        for b in range(a + 1, bins):
            score = 0.0
            for lo, hi in ((0, a), (a, b), (b, bins)):
                w = cw[hi] - cw[lo]
                if w > 0:
                    score += (cm[hi] - cm[lo]) ** 2 / w
            if score > best:
                best, pair = score, (a, b)
    return float(edges[pair[0]]), float(edges[pair[1]])


def kmeans_1d(values: npt.NDArray[np.floating], k: int = 3, rounds: int = 20) -> npt.NDArray[np.float64]:
    """Sorted centres of ``k`` clusters of ``values`` (initialised at evenly spaced percentiles)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    centres = np.percentile(v, np.linspace(100.0 / (2 * k), 100.0 - 100.0 / (2 * k), k))
    for _ in range(rounds):
        bounds = (centres[:-1] + centres[1:]) / 2.0
        idx = np.searchsorted(bounds, v)
        new = np.array([v[idx == i].mean() if np.any(idx == i) else centres[i] for i in range(k)])
        if np.allclose(new, centres):
            break
        centres = np.sort(new)
    return np.asarray(centres, dtype=np.float64)


def has_simpleitk() -> bool:
    return importlib.util.find_spec("SimpleITK") is not None


def correct_bias(
    image: FloatArray, mask: BoolArray, spacing: tuple[float, float, float], method: BiasMethod = "auto",
    field_mm: float = 40.0,
) -> tuple[FloatArray, str]:
    """``image`` divided by its estimated bias field (inside ``mask``), and the method used."""
    if method == "auto":
        method = "n4" if has_simpleitk() else "smooth"
    if method == "none" or not mask.any():
        return image, "none"
    if method == "n4":
        return _n4(image, mask, spacing), "n4"
    return _smooth_field(image, mask, spacing, field_mm), "smooth"


def _smooth_field(image: FloatArray, mask: BoolArray, spacing: tuple[float, float, float], field_mm: float
                  ) -> FloatArray:
    sigma = tuple(field_mm / s for s in spacing)
    positive = mask & (image > 0)
    log = np.zeros(image.shape, dtype=np.float32)
    log[positive] = np.log(image[positive])
    field = np.zeros_like(log)
    for _ in range(3):
        corrected = log - field
        centres = kmeans_1d(corrected[positive], 3)
        bounds = (centres[:-1] + centres[1:]) / 2.0
        cls = np.searchsorted(bounds, corrected)
        voters = positive & (cls > 0)
        residual = np.where(voters, log - centres[np.clip(cls, 0, 2)], 0.0).astype(np.float32)
        num = ndimage.gaussian_filter(residual, sigma)
        den = ndimage.gaussian_filter(voters.astype(np.float32), sigma)
        field = np.where(den > 1e-3, num / np.maximum(den, 1e-3), 0.0).astype(np.float32)
        field -= float(np.mean(field[voters])) if voters.any() else 0.0
    return (image * np.exp(-field)).astype(np.float32)


def _n4(image: FloatArray, mask: BoolArray, spacing: tuple[float, float, float]) -> FloatArray:
    import SimpleITK as sitk  # the ml extra

    img = sitk.GetImageFromArray(np.maximum(image, 0).astype(np.float32))
    img.SetSpacing((spacing[2], spacing[1], spacing[0]))
    msk = sitk.GetImageFromArray(mask.astype(np.uint8))
    msk.CopyInformation(img)
    shrink = [2, 2, 1] if spacing[0] > 2 * spacing[2] else [2, 2, 2]
    small, small_mask = sitk.Shrink(img, shrink), sitk.Shrink(msk, shrink)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([30, 20, 10])
    n4.Execute(small, small_mask)
    log_field = n4.GetLogBiasFieldAsImage(img)
    field = sitk.GetArrayFromImage(log_field).astype(np.float32)
    return (image * np.exp(-field)).astype(np.float32)
