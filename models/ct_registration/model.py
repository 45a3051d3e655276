"""Classical registration of a PRIOR series onto the CURRENT one (SimpleITK, no trained weights).

Outline of :meth:`CtRegistration.run_pair` (settings in :class:`RegistrationParams`):

Images
    Each :class:`Volume` becomes a SimpleITK image on its own patient geometry (origin =
    ``affine[:3, 3]``, spacing = column norms, direction = normalised columns; the array
    ``voxels[k, j, i]`` is SimpleITK's (x, y, z) = (i, j, k)). CT is clipped to ``ct_clip_hu``
    and shifted so that air is 0 (moments then weigh tissue, not air). Both are bin-averaged to
    about ``work_mm`` for the optimisation.
Optimisation
    The CURRENT image is SimpleITK's fixed image and the PRIOR the moving one, so the result maps
    current points to prior points. A rigid Euler transform centred by image moments, then an
    affine transform started from it; Mattes mutual information (``histogram_bins``), random
    sampling of at most ``max_samples`` voxels per level with a fixed ``seed`` and by default one
    thread (so the same input gives bit-identical results), regular-step gradient descent with
    scales from physical shifts, shrink factors ``shrink_factors`` with smoothing
    ``smoothing_mm``.
Outputs
    ``Registration.transform`` (4x4, current LPS -> prior LPS), the prior resampled onto the
    current grid (linear; ``-1024`` HU or 0 outside the prior), the final metric value and
    ``residual_mm``: on the working grid, tissue/air boundaries (CT: ``boundary_hu``; MR: Otsu
    threshold of the current image) of the current image and of the registered prior; the RMS,
    over current boundary voxels where the prior has data, of the distance to the nearest prior
    boundary voxel. About 0 for a perfect rigid match (limited by the ~``work_mm`` grid); it
    also grows with real anatomical change, so it is a plausibility figure, not an error bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage as ndi

from models.base import (
    Manifest,
    ModelResult,
    Registration,
    UnsuitableInput,
    Volume,
    check_input,
)
from models.manifest import MANIFEST_FILENAME, load_manifest

MANIFEST_PATH = Path(__file__).with_name(MANIFEST_FILENAME)

CT_AIR = -1024.0


@dataclass(frozen=True)
class RegistrationParams:
    """Optimisation settings (mm, HU, counts)."""

    work_mm: float = 2.0
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_mm: tuple[float, ...] = (4.0, 2.0, 0.0)
    histogram_bins: int = 32
    max_samples: int = 20_000
    seed: int = 20_240_601
    threads: int = 1  # 1: bit-identical results; more: faster, reproducible to about 1e-8 mm
    rigid_iterations: int = 200
    affine_iterations: int = 100
    learning_rate: float = 2.0  # first step, in units of the physical-shift scales (about mm)
    min_step: float = 1e-3
    affine: bool = True
    affine_min_gain: float = 0.002  # relative MI improvement the affine stage must bring
    ct_clip_hu: tuple[float, float] = (-1024.0, 1500.0)
    boundary_hu: float = -500.0
    max_slice_mm: float = 10.0


class CtRegistration:
    """The ``ct-registration`` model: implements :class:`models.base.PairModel` (stateless)."""

    def __init__(self, params: RegistrationParams | None = None, manifest_path: Path = MANIFEST_PATH) -> None:
        self.manifest: Manifest = load_manifest(manifest_path)
        self.params = params or RegistrationParams()
        if len(self.params.shrink_factors) != len(self.params.smoothing_mm):
            raise ValueError("shrink_factors and smoothing_mm need one entry per level")

    def check(self, volume: Volume) -> None:
        """Raise :class:`UnsuitableInput` unless ``volume`` can be either series of a pair."""
        check_input(self.manifest, volume, max_slice_mm=self.params.max_slice_mm)

    def run(self, volume: Volume) -> ModelResult:
        """Always :class:`UnsuitableInput`: registration needs a prior series (use :meth:`run_pair`)."""
        self.check(volume)
        raise UnsuitableInput(f"{self.manifest.name} needs a prior series: call run_pair(current, prior)")

    def run_pair(self, current: Volume, prior: Volume) -> ModelResult:
        """Register ``prior`` onto ``current``; the result belongs to the CURRENT series."""
        self.check(current)
        self.check(prior)
        registration, notes = register(current, prior, self.params)
        return ModelResult(
            model_name=self.manifest.name,
            model_version=self.manifest.version,
            notes=tuple(notes),
            registration=registration,
        )


# --------------------------------------------------------------------------------------------
# Geometry helpers.


def to_sitk(volume: Volume, voxels: npt.NDArray[np.float32] | None = None) -> sitk.Image:
    """``volume`` (or ``voxels`` on its grid) as a float32 SimpleITK image on its patient geometry."""
    array = volume.voxels if voxels is None else voxels
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))  # (k, j, i) -> (x=i, y=j, z=k)
    columns = volume.affine[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)  # i, j, k
    image.SetOrigin(tuple(float(v) for v in volume.affine[:3, 3]))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetDirection(tuple(float(v) for v in (columns / spacing).ravel()))  # row-major, columns = axes
    return image


def transform_to_matrix(transform: sitk.Euler3DTransform | sitk.AffineTransform) -> npt.NDArray[np.float64]:
    """A rigid or affine SimpleITK transform as a 4x4 matrix: ``x' = A (x - c) + c + t``."""
    a = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.asarray(transform.GetCenter(), dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = a
    out[:3, 3] = c + np.asarray(transform.GetTranslation(), dtype=np.float64) - a @ c
    return out


def _prepare(volume: Volume, p: RegistrationParams) -> tuple[sitk.Image, float]:
    """Image for the metric (CT shifted so air is 0) and its fill value in those units."""
    if volume.modality == "CT":
        lo, hi = p.ct_clip_hu
        return to_sitk(volume, np.clip(volume.voxels, lo, hi) - np.float32(lo)), 0.0
    return to_sitk(volume), 0.0


def _working(image: sitk.Image, work_mm: float) -> sitk.Image:
    factors = [max(1, round(work_mm / s)) for s in image.GetSpacing()]
    return sitk.BinShrink(image, factors) if any(f > 1 for f in factors) else image


# --------------------------------------------------------------------------------------------
# The registration.


def register(current: Volume, prior: Volume, p: RegistrationParams) -> tuple[Registration, list[str]]:
    """The :class:`Registration` of ``prior`` onto ``current`` and notes."""
    # SimpleITK filters and the metric use the process-wide thread count; multi-threaded sums
    # differ in the last bits from run to run, so it is set for the duration of the call.
    saved = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(p.threads)
    try:
        return _register(current, prior, p)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(saved)


def _register(current: Volume, prior: Volume, p: RegistrationParams) -> tuple[Registration, list[str]]:
    notes: list[str] = []
    if current.frame_of_reference_uid == prior.frame_of_reference_uid:
        notes.append("both series share a Frame of Reference (registered anyway)")
    fixed_full, _ = _prepare(current, p)
    moving_full, _ = _prepare(prior, p)
    fixed = _working(fixed_full, p.work_mm)
    moving = _working(moving_full, p.work_mm)

    rigid = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    rigid = sitk.Euler3DTransform(rigid)
    _optimise(fixed, moving, rigid, p.rigid_iterations, p)
    final: sitk.Euler3DTransform | sitk.AffineTransform = rigid
    metric = _evaluate(fixed, moving, rigid, p)
    if p.affine:
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        affine.SetCenter(rigid.GetCenter())
        _optimise(fixed, moving, affine, p.affine_iterations, p)
        affine_metric = _evaluate(fixed, moving, affine, p)
        notes.append(f"MI rigid {metric:.4f}, affine {affine_metric:.4f}")
        if affine_metric < metric - p.affine_min_gain * abs(metric):
            final, metric = affine, affine_metric
        else:
            notes.append("affine stage did not improve the rigid match: rigid transform kept")
    matrix = transform_to_matrix(final)

    fill = CT_AIR if prior.modality == "CT" else 0.0
    resampled = sitk.Resample(to_sitk(prior), to_sitk(current), final, sitk.sitkLinear, fill, sitk.sitkFloat32)
    resampled_array = sitk.GetArrayFromImage(resampled).astype(np.float32, copy=False)

    residual = _boundary_residual(fixed, moving, final, current.modality, p)
    notes.append(
        f"rigid+affine MI {metric:.4f}; boundary residual {residual:.2f} mm; "
        f"translation {np.round(matrix[:3, 3], 1).tolist()} mm"
    )
    registration = Registration(
        transform=matrix,
        residual_mm=residual,
        metric_value=metric,
        resampled=resampled_array,
        prior_frame_of_reference_uid=prior.frame_of_reference_uid,
    )
    return registration, notes


def _optimise(
    fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, iterations: int, p: RegistrationParams
) -> float:
    """Optimise ``transform`` in place; the final metric value."""
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(p.threads)
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=p.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    n_voxels = float(np.prod(fixed.GetSize()))
    fractions = [min(1.0, p.max_samples * f**3 / n_voxels) for f in p.shrink_factors]
    method.SetMetricSamplingPercentagePerLevel(fractions, p.seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=p.learning_rate,
        minStep=p.min_step,
        numberOfIterations=iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(p.shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(p.smoothing_mm))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    return float(method.GetMetricValue())


def _evaluate(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, p: RegistrationParams) -> float:
    """Mattes MI of ``transform`` on every voxel of the working grid (comparable between transforms)."""
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(p.threads)
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=p.histogram_bins)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetInitialTransform(transform, inPlace=False)
    return float(method.MetricEvaluate(fixed, moving))


def _boundary_residual(
    fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, modality: str, p: RegistrationParams
) -> float:
    """RMS distance (mm) from the fixed image's tissue/air boundary to the registered moving one's."""
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -1.0, sitk.sitkFloat32)
    a = sitk.GetArrayFromImage(fixed)
    b = sitk.GetArrayFromImage(warped)
    valid = ndi.binary_erosion(b >= 0.0, iterations=2)
    if modality == "CT":
        threshold = p.boundary_hu - p.ct_clip_hu[0]
    else:
        otsu = sitk.OtsuThresholdImageFilter()
        otsu.Execute(fixed)
        threshold = float(otsu.GetThreshold())
    spacing = np.asarray(fixed.GetSpacing(), dtype=np.float64)[::-1]  # (k, j, i)
    edge_a = _boundary(a > threshold) & valid
    edge_b = _boundary(b > threshold)
    if not edge_a.any() or not edge_b.any():
        return float("nan")
    dist = ndi.distance_transform_edt(~edge_b, sampling=spacing)
    return float(np.sqrt(np.mean(dist[edge_a] ** 2)))


def _boundary(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    return mask & ~ndi.binary_erosion(mask)
