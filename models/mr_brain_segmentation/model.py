"""Classical head and brain segmentation on T1- or T2-weighted MR (no trained weights).

Outline of :meth:`MrBrainSegmentation.run` (every threshold from the image's own histogram):

Head
    Otsu threshold of the lightly smoothed image (air and noise against tissue), holes filled per
    slice and in 3-D (the skull, dark on every sequence, is enclosed by the scalp), the largest
    connected component, a closing of ``close_mm``.
Bias field
    :func:`models.mr_brain_segmentation.intensity.correct_bias` inside the head (N4 when SimpleITK
    is installed, else a smooth-field estimate).
Brain
    Tissue = head voxels above the Otsu threshold of the log image inside the head (skull, air
    cavities and noise fall below). Eroded by ``erode_mm``, the most interior large component (the
    one whose voxels lie deepest inside the head) is the intracranial tissue, grown back within
    the tissue. The weighting is read from the image: when the rim of that region (2-6 mm inside:
    CSF and cortex) is brighter than its core (over 12 mm inside; T2-like), the brightest of three
    Otsu classes is CSF and removed; when it is darker (T1-like), CSF already fell below the tissue
    threshold. An opening of
    ``open_mm``, the largest component and 3-D hole filling (the ventricles are brain) end it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.base import Manifest, ModelResult, Segment, UnsuitableInput, Volume, check_input
from models.errors import ManifestError
from models.manifest import MANIFEST_FILENAME, load_manifest_file
from models.mr_brain_segmentation.intensity import BiasMethod, correct_bias, otsu, otsu3

MANIFEST_PATH = Path(__file__).with_name(MANIFEST_FILENAME)
BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class MrBrainParams:
    """Sizes (mm, ml) and the bias-field method."""

    bias: BiasMethod = "auto"
    smooth_mm: float = 1.0
    close_mm: float = 4.0
    erode_mm: float = 4.0
    open_mm: float = 2.0
    min_head_ml: float = 500.0
    min_brain_ml: float = 300.0


def _ball(radius_mm: float, spacing: tuple[float, float, float]) -> BoolArray:
    r = [max(0, int(radius_mm / s)) for s in spacing]
    zz, yy, xx = np.ogrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1, -r[2]:r[2] + 1]
    d = (zz * spacing[0]) ** 2 + (yy * spacing[1]) ** 2 + (xx * spacing[2]) ** 2
    return np.asarray(d <= radius_mm**2 + 1e-6)


def _largest(mask: BoolArray) -> BoolArray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    return np.asarray(labels == int(np.argmax(sizes)) + 1)


def _fill(mask: BoolArray) -> BoolArray:
    per_slice = np.stack([ndimage.binary_fill_holes(s) for s in mask])
    return np.asarray(ndimage.binary_fill_holes(per_slice))


def segment_head(voxels: FloatArray, spacing: tuple[float, float, float], params: MrBrainParams) -> BoolArray:
    """Head (not air) mask: Otsu on the smoothed image, largest component, holes filled, closed."""
    smooth = ndimage.gaussian_filter(voxels, sigma=tuple(params.smooth_mm / s for s in spacing))
    head = _largest(_fill(smooth > otsu(smooth)))  # filled first: the scalp is a thin ring around the brain
    head = ndimage.binary_closing(head, structure=_ball(params.close_mm, spacing), border_value=0)
    return _fill(head)


def segment_brain(
    corrected: FloatArray, head: BoolArray, spacing: tuple[float, float, float], params: MrBrainParams,
) -> tuple[BoolArray, str]:
    """Brain mask inside ``head`` of the bias-corrected image, and the weighting seen (``T1``/``T2``)."""
    log = np.log(np.maximum(corrected, 1e-3))
    tissue = head & (log > otsu(log[head]))
    core = ndimage.binary_erosion(tissue, structure=_ball(params.erode_mm, spacing))
    depth = ndimage.distance_transform_edt(head, sampling=spacing)
    labels, n = ndimage.label(core)
    if n == 0:
        raise UnsuitableInput("no brain found: the head has no tissue deep inside the skull")
    index = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(core, labels, index)
    deep = ndimage.mean(depth, labels, index)
    large = sizes >= 0.2 * sizes.max()
    chosen = int(index[large][np.argmax(deep[large])])
    inner = ndimage.binary_dilation(labels == chosen, structure=_ball(params.erode_mm, spacing), mask=tissue)
    inside = ndimage.distance_transform_edt(inner, sampling=spacing)
    rim, body = (inside > 2.0) & (inside <= 6.0), inside > 12.0  # rim: past the skull's partial volume
    bright_rim = bool(rim.any() and body.any()) and float(np.median(corrected[rim])) > float(np.median(corrected[body]))
    weighting = "T2" if bright_rim else "T1"
    brain = inner
    if bright_rim:
        _, csf_from = otsu3(log[inside > 2.0])  # white, grey, CSF (skull partial volume left out)
        brain = inner & (log < csf_from)
    brain = ndimage.binary_opening(brain, structure=_ball(params.open_mm, spacing))
    return _fill(_largest(brain)), weighting


class MrBrainSegmentation:
    """The ``mr-brain-segmentation`` model (stateless between calls; safe to reuse)."""

    def __init__(self, params: MrBrainParams | None = None, manifest_path: Path = MANIFEST_PATH) -> None:
        file = load_manifest_file(manifest_path)
        self.manifest: Manifest = file.to_manifest()
        self.params = params or MrBrainParams()
        names = [o.name for o in self.manifest.outputs]
        if names != ["Head", "Brain"]:
            raise ManifestError(f"{manifest_path}: outputs must be ['Head', 'Brain'], got {names}")

    def check(self, volume: Volume) -> None:
        """Raise :class:`UnsuitableInput` unless ``volume`` is an MR stack of enough slices."""
        check_input(self.manifest, volume)

    def run(self, volume: Volume) -> ModelResult:
        """Head and brain masks; :class:`UnsuitableInput` when there is too little of either."""
        self.check(volume)
        p = self.params
        spacing = volume.spacing
        voxels = np.asarray(volume.voxels, dtype=np.float32)
        head = segment_head(voxels, spacing, p)
        vml = volume.voxel_volume_ml
        head_ml = float(head.sum()) * vml
        if head_ml < p.min_head_ml:
            raise UnsuitableInput(f"{self.manifest.name}: only {head_ml:.0f} ml of tissue: not a head MR")
        corrected, method = correct_bias(voxels, head, spacing, p.bias)
        brain, weighting = segment_brain(corrected, head, spacing, p)
        brain_ml = float(brain.sum()) * vml
        if brain_ml < p.min_brain_ml:
            raise UnsuitableInput(
                f"{self.manifest.name}: only {brain_ml:.0f} ml of brain found (needs {p.min_brain_ml:.0f} ml): "
                "not a head MR covering the brain"
            )
        head_label, brain_label = self.manifest.outputs
        segments = (
            Segment(head_label.name, head_label.category, head_label.type, head),
            Segment(brain_label.name, brain_label.category, brain_label.type, brain),
        )
        notes = (
            f"bias field: {method}; contrast seen: {weighting}-like (CSF {'bright' if weighting == 'T2' else 'dark'})",
            f"head {head_ml:.0f} ml, brain {brain_ml:.0f} ml",
        )
        return ModelResult(self.manifest.name, self.manifest.version, segments=segments, notes=notes)
