"""``dl-emphysema-classification``: emphysema grade (None/Mild/Moderate/Severe) from a lung-masked CT.

Pipeline of :meth:`DlEmphysemaClassification.run`:

1. Lungs come from :class:`models.dl_ct_segmentation.DlCtSegmentation` (right and left lung).
2. In canonical orientation, the lungs' bounding box (plus ``margin_mm``) is cut out and
   area-averaged to ``in_shape`` (48^3 in the demo bundle) as two channels: HU scaled by the
   bundle's ``ScaleIntensityRanged`` (its ``preprocessing``) times the lung mask, and the lung mask.
3. A small MONAI ``Classifier`` (3-D CNN), run by the bundle's ``inferer`` (SimpleInferer), gives one
   logit per grade; the bundle's ``postprocessing`` (Activationsd softmax) gives the probabilities and
   the grade is the argmax. Grade names come from metadata.json's channel_def.

Grades and their codes are those of ``ct-emphysema`` (:data:`models.ct_emphysema.GRADES`: low-
attenuation lung below 5 % absent, 5-15 % mild, 15-25 % moderate, 25 % or more severe); the
network learnt them from synthetic emphysema (-980 HU patches). It does not estimate LAA%:
``Classification.score`` is the softmax probability of the reported grade (unit ``1``, not
calibrated); ``details`` gives every grade's probability and the lung volume.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Unpack

import numpy as np
import numpy.typing as npt
import torch
from pydantic import Field

from models.base import Classification, ModelResult, UnsuitableInput, Volume
from models.ct_emphysema import GRADES
from models.dl.core import DlModel, DlOptions, Params
from models.dl.items import transforms_by_name
from models.dl.runtime import Orientation, hu_to_unit, resample, tensor
from models.dl_ct_segmentation.model import OUT_LEFT, OUT_RIGHT, DlCtSegmentation
from models.errors import BundleError, ManifestError


class ClsParams(Params):
    """``dicom_node`` parameters of a classification bundle (``hu_window`` and ``grades`` are the legacy form,
    used only without ``preprocessing`` items / channel_def)."""

    in_shape: tuple[int, int, int, int] = (2, 48, 48, 48)
    hu_window: tuple[float, float] = (-1024.0, -600.0)
    margin_mm: float = Field(5.0, ge=0.0)
    grades: tuple[str, ...] = tuple(g.meaning for g in GRADES)
    min_lung_ml: float = Field(100.0, ge=0.0)


def classifier_input(
    hu: npt.NDArray[np.generic],
    lung: npt.NDArray[np.bool_],
    spacing: tuple[float, float, float],
    params: ClsParams,
    scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The network input (1, 2, *in_shape[1:]) from canonical HU and lung mask (shared with training);
    ``scale`` maps HU to [0, 1] (default: ``params.hu_window``)."""
    idx = (
        np.nonzero(lung.any(axis=(1, 2)))[0],
        np.nonzero(lung.any(axis=(0, 2)))[0],
        np.nonzero(lung.any(axis=(0, 1)))[0],
    )
    box = []
    for a in range(3):
        pad = int(np.ceil(params.margin_mm / spacing[a]))
        box.append(slice(max(0, int(idx[a][0]) - pad), min(lung.shape[a], int(idx[a][-1]) + 1 + pad)))
    sub = tensor(hu[tuple(box)])
    mask = tensor(lung[tuple(box)])
    unit = hu_to_unit(sub, params.hu_window) if scale is None else torch.as_tensor(scale(sub)).as_subclass(torch.Tensor)
    x = torch.stack([unit.float() * mask, mask])[None]
    return resample(x, params.in_shape[1:]).contiguous()


class DlEmphysemaClassification(DlModel[ClsParams]):
    """The ``dl-emphysema-classification`` model (see the module docstring); stateless between calls.

    ``segmenter`` supplies the lung masks (default: a :class:`DlCtSegmentation` with
    ``segmentation_bundle``, or the shipped one, on the same device, batch size and precision).
    """

    PACKAGE = "dl_emphysema_classification"
    PARAMS = ClsParams

    def __init__(
        self,
        bundle: str | Path | None = None,
        *,
        segmenter: DlCtSegmentation | None = None,
        segmentation_bundle: str | Path | None = None,
        **options: Unpack[DlOptions],
    ) -> None:
        super().__init__(bundle, **options)
        self.segmenter = segmenter or DlCtSegmentation(
            segmentation_bundle, device=self.device, batch_size=self.batch_size, precision=self.precision
        )
        self.expect_output(torch.zeros(1, *self.params.in_shape), len(GRADES))

    def setup(self) -> None:
        expected = tuple(g.meaning for g in GRADES)
        cfg = self.bundle_config()
        channels = cfg.channel_def if cfg is not None else {}
        self.grades = tuple(channels[i] for i in sorted(channels)) if channels else tuple(self.params.grades)
        if self.grades != expected:
            raise BundleError(f"{self.loaded.source}: grades must be {list(expected)}, got {list(self.grades)}")
        self.scale: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.inferer: Callable[..., Any] = lambda x, net: net(x)
        self.post: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self.pipeline_source = "dicom_node"
        if cfg is not None and "inferer" in cfg:
            self.inferer, self.pipeline_source = cfg.inferer(), "bundle items"
        if cfg is not None and "preprocessing" in cfg:
            found = transforms_by_name(cfg.preprocessing())
            if "ScaleIntensityRanged" not in found:
                raise BundleError(f"{cfg.where('preprocessing')}: a ScaleIntensityRanged transform is required")
            self.scale = found["ScaleIntensityRanged"].scaler
        if cfg is not None and "postprocessing" in cfg:
            self.post = cfg.postprocessing()
        if [o.name for o in self.manifest.outputs] != ["Emphysema"]:
            raise ManifestError(f"{self.manifest.name}: the manifest must declare the single output 'Emphysema'")
        self._label = self.manifest.outputs[0]

    def run(self, volume: Volume) -> ModelResult:
        """Grade emphysema in ``volume`` (one :class:`Classification`)."""
        self.check(volume)
        labels = self.segmenter.label_map(volume)
        lung = (labels == OUT_RIGHT) | (labels == OUT_LEFT)
        lung_ml = float(lung.sum()) * volume.voxel_volume_ml
        if lung_ml < self.params.min_lung_ml:
            raise UnsuitableInput(f"{self.manifest.name}: only {lung_ml:.0f} ml of lung found")
        orient = Orientation.of(volume.affine)
        x = classifier_input(
            orient.to_canonical(volume.voxels), orient.to_canonical(lung), orient.canonical_spacing(), self.params,
            self.scale,
        )
        with torch.no_grad(), self.autocast():
            logits = self.inferer(x.to(self.device), self.network)
        if self.post is None:
            prob = torch.softmax(logits.float()[0], dim=0).cpu().numpy()
        else:
            out = self.post({"pred": logits.float()[0]})["pred"]
            prob = torch.as_tensor(out).as_subclass(torch.Tensor).cpu().numpy()
        grade = int(np.argmax(prob))
        details = {f"P({g})": float(p) for g, p in zip(self.grades, prob, strict=True)}
        details["lung volume (ml)"] = lung_ml
        cls = Classification(
            name=self._label.name,
            concept=self._label.type,
            value=GRADES[grade],
            score=float(prob[grade]),
            score_unit="1",
            details=details,
        )
        notes = (
            f"{self.note()}, pipeline from {self.pipeline_source}",
            f"lung masks from {self.segmenter.manifest.name}: {self.segmenter.note()}",
            f"{lung_ml:.0f} ml lung: {GRADES[grade].meaning} (p = {prob[grade]:.2f})",
        )
        return ModelResult(self.manifest.name, self.manifest.version, notes=notes, classifications=(cls,))
