"""``dl-lung-nodule-detection``: lung nodule candidates on CT from a centre heatmap (CenterNet-style).

Not MONAI's RetinaNet: a small MONAI 3-D U-Net predicts, on a 2 mm grid (the bundle's ``preprocessing``
and ``inferer`` items, :mod:`models.dl.items`), two channels: a
nodule-centre heatmap (logit; trained with the CenterNet focal loss on Gaussian blobs at nodule
centres) and the nodule diameter (in units of ``diameter_scale_mm``). Decoding:

1. sigmoid heatmap, local maxima over 3x3x3 voxels with a score >= ``score_threshold``;
2. sub-voxel centre = heat-weighted centroid of the 3x3x3 neighbourhood; diameter read at the peak;
3. boxes (sphere bounds in patient mm) pass ``monai.data.box_utils.non_max_suppression``
   (IoU ``nms_iou``), at most ``max_detections`` are kept, strongest first.

``confidence`` is the heatmap peak value: a ranking score, not a calibrated probability.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from monai.data.box_utils import non_max_suppression
from pydantic import Field

from models.base import Detection, ModelResult, Volume
from models.dl.core import DlModel, Params
from models.dl.items import GridPipeline, grid_pipeline
from models.dl.runtime import Orientation, resample, tensor, work_to_canonical_index
from models.dl.runtime import work_shape as grid_shape
from models.errors import ManifestError


class DetParams(Params):
    """``dicom_node`` parameters of a detection bundle: the heat-map decoding (model-specific). ``spacing_mm``,
    ``hu_window``, ``roi_size`` and ``overlap`` are the legacy form, used only without ``preprocessing``/``inferer``
    items (:mod:`models.dl.items`)."""

    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    roi_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    score_threshold: float = Field(0.25, gt=0.0, lt=1.0)
    nms_iou: float = Field(0.1, ge=0.0, le=1.0)
    max_detections: int = Field(20, ge=1)
    diameter_scale_mm: float = 20.0
    min_diameter_mm: float = 3.0


class DlNoduleDetection(DlModel[DetParams]):
    """The ``dl-lung-nodule-detection`` model (see the module docstring); stateless between calls."""

    PACKAGE = "dl_lung_nodule_detection"
    PARAMS = DetParams

    def setup(self) -> None:
        if len(self.manifest.outputs) != 1:
            raise ManifestError(f"{self.manifest.name}: the manifest must declare exactly one output "
                                "(the finding type)")
        p = self.params
        self.pipeline: GridPipeline = grid_pipeline(
            self.bundle_config(), window=p.hu_window, spacing_mm=p.spacing_mm, roi_size=p.roi_size,
            overlap=p.overlap, batch_size=self.batch_size, mode="constant")
        roi = getattr(self.pipeline.inferer, "roi_size", p.roi_size)
        self.expect_output(torch.zeros(1, 1, *(min(int(r), 32) for r in roi)), 2)

    def run(self, volume: Volume) -> ModelResult:
        """Detect nodules in ``volume`` (strongest first)."""
        self.check(volume)
        found = self.detect(volume)
        out = self.manifest.outputs[0]
        detections = []
        inv = np.linalg.inv(volume.affine[:3, :3])
        half_scale = np.linalg.norm(inv, axis=1)  # index units per mm along i, j, k
        dims = np.array(volume.voxels.shape[::-1])  # (i, j, k) sizes
        for n, (centre_lps, diameter, score) in enumerate(found, start=1):
            ijk = inv @ (centre_lps - volume.affine[:3, 3])
            half = half_scale * diameter / 2
            lo = np.clip(np.floor(ijk - half), 0, dims - 1).astype(int)
            hi = np.clip(np.ceil(ijk + half), 0, dims - 1).astype(int)
            detections.append(
                Detection(
                    label=f"{out.name} {n}",
                    type=out.type,
                    centre_ijk=(float(ijk[0]), float(ijk[1]), float(ijk[2])),
                    centre_lps=(float(centre_lps[0]), float(centre_lps[1]), float(centre_lps[2])),
                    bbox_ijk_min=(int(lo[0]), int(lo[1]), int(lo[2])),
                    bbox_ijk_max=(int(hi[0]), int(hi[1]), int(hi[2])),
                    diameter_mm=float(diameter),
                    confidence=float(np.clip(score, 0.0, 1.0)),
                    tracking_id=f"{out.name.lower()}-{n}",
                )
            )
        notes = [
            f"{self.note()}, pipeline from {self.pipeline.source}",
            f"{len(detections)} candidate(s) with score >= {self.params.score_threshold}",
        ]
        return ModelResult(
            model_name=self.manifest.name,
            model_version=self.manifest.version,
            notes=tuple(notes),
            detections=tuple(detections),
        )

    def heatmap(self, volume: Volume) -> tuple[torch.Tensor, Orientation]:
        """Network output (2, *work_shape) on the working grid: sigmoid heat and diameter (mm)."""
        p, pipe = self.params, self.pipeline
        orient = Orientation.of(volume.affine)
        canonical = np.asarray(orient.to_canonical(volume.voxels), dtype=np.float32)
        x = pipe.to_input(tensor(canonical)[None, None])
        x = resample(x, grid_shape(canonical.shape, orient.canonical_spacing(), pipe.spacing_mm)).contiguous()
        with torch.no_grad(), self.autocast():
            out = pipe.inferer(x.to(self.device), self.network)
        assert isinstance(out, torch.Tensor)
        out = out[0].float().cpu()
        return torch.stack([torch.sigmoid(out[0]), out[1] * p.diameter_scale_mm]), orient

    def detect(self, volume: Volume) -> list[tuple[npt.NDArray[np.float64], float, float]]:
        """``(centre LPS mm, diameter mm, score)`` per kept detection, strongest first."""
        p = self.params
        out, orient = self.heatmap(volume)
        heat, size = out[0], out[1]
        peaks = decode_peaks(heat, p.score_threshold, 4 * p.max_detections)
        if not peaks:
            return []
        can_shape = orient.canonical_shape(volume.voxels.shape)
        aff = orient.canonical_affine(volume.voxels.shape)
        centres, diameters, scores = [], [], []
        for zyx, score in peaks:
            c = work_to_canonical_index(zyx, can_shape, heat.shape)  # canonical (z, y, x)
            centres.append(aff[:3, :3] @ c[::-1] + aff[:3, 3])
            zi, yi, xi = (round(float(v)) for v in zyx)
            diameters.append(max(p.min_diameter_mm, float(size[zi, yi, xi])))
            scores.append(score)
        ctr = np.asarray(centres)
        half = np.asarray(diameters)[:, None] / 2
        boxes = np.concatenate([ctr - half, ctr + half], axis=1)
        keep = non_max_suppression(boxes, np.asarray(scores), p.nms_iou, max_proposals=p.max_detections)
        return [(ctr[i], float(diameters[i]), float(scores[i])) for i in np.asarray(keep).tolist()]


def decode_peaks(heat: torch.Tensor, threshold: float, limit: int) -> list[tuple[npt.NDArray[np.float64], float]]:
    """Local maxima (3x3x3) of ``heat`` (D, H, W) at or above ``threshold``: sub-voxel (z, y, x), score.

    At most ``limit``, strongest first.
    """
    h = heat[None, None]
    pooled = F.max_pool3d(h, 3, stride=1, padding=1)
    mask = (h == pooled) & (h >= threshold)
    idx = torch.nonzero(mask[0, 0])
    if idx.numel() == 0:
        return []
    scores = heat[idx[:, 0], idx[:, 1], idx[:, 2]]
    order = torch.argsort(scores, descending=True)[:limit]
    padded = F.pad(h, (1, 1, 1, 1, 1, 1))[0, 0]
    offsets = torch.stack(torch.meshgrid(*(torch.arange(-1, 2),) * 3, indexing="ij"), dim=-1).reshape(-1, 3)
    out = []
    for i in order.tolist():
        z, y, x = (int(v) for v in idx[i])
        patch = padded[z : z + 3, y : y + 3, x : x + 3].reshape(-1)
        w = patch / patch.sum().clamp(min=1e-6)
        sub = (offsets.float() * w[:, None]).sum(dim=0).numpy().astype(np.float64)
        out.append((np.array([z, y, x], dtype=np.float64) + sub, float(scores[i])))
    return out
