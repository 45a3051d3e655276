"""``dl-ct-segmentation``: body, right/left lung and bone on CT with a small MONAI 3-D U-Net.

Pipeline of :meth:`DlCtSegmentation.run`:

1. The volume is viewed in canonical orientation (:class:`models.dl.runtime.Orientation`, the
   bundle's ``Orientationd`` LPS), its HU scaled by the bundle's own ``ScaleIntensityRanged``, then
   resampled (area-averaged) to the bundle's ``Spacingd`` spacing (3 mm in the demo bundle); see
   :mod:`models.dl.items`.
2. The bundle's ``inferer`` (SlidingWindowInferer) runs the U-Net (classes from metadata.json's
   channel_def: background, other body tissue, lung, bone), ``batch_size`` windows at a time.
3. Lung components are assigned a side from patient coordinates (``Volume.affine``: LPS +x is the
   patient's left) relative to the body's centre; a component lying on both sides is split at
   that plane. Components under ``min_lung_ml`` are dropped.
4. Class probabilities are interpolated linearly back to the input grid slab by slab and the
   argmax taken there, so masks have the input's shape and follow its geometry.

"Body" is every voxel not classified as background (lungs and bone included).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from pydantic import Field
from scipy import ndimage as ndi

from models.base import ModelResult, Segment, Volume
from models.dl.core import DlModel, Params
from models.dl.items import GridPipeline, grid_pipeline
from models.dl.runtime import (
    Orientation,
    argmax_channels,
    resample,
    tensor,
    upsample_chunks,
    work_axis_to_canonical,
)
from models.dl.runtime import (
    work_shape as grid_shape,
)
from models.errors import BundleError, ManifestError

CLASSES = ("background", "body", "lung", "bone")
BACKGROUND, BODY, LUNG, BONE = range(4)
# Output label map values (full resolution): 0 outside, then:
OUT_BODY, OUT_RIGHT, OUT_LEFT, OUT_BONE = 1, 2, 3, 4
SEGMENT_NAMES = ("Body", "Right Lung", "Left Lung", "Bone")

BoolArray = npt.NDArray[np.bool_]


class SegParams(Params):
    """``dicom_node`` parameters of a segmentation bundle: ``min_lung_ml`` (model-specific). The others are
    the legacy form, used only by a bundle or TorchScript file without ``preprocessing``/``inferer`` items."""

    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    roi_size: tuple[int, int, int] = (64, 64, 64)
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    classes: tuple[str, ...] = CLASSES
    min_lung_ml: float = 5.0


class DlCtSegmentation(DlModel[SegParams]):
    """The ``dl-ct-segmentation`` model (see the module docstring); stateless between calls."""

    PACKAGE = "dl_ct_segmentation"
    PARAMS = SegParams

    def setup(self) -> None:
        cfg = self.bundle_config()
        p = self.params
        channels = cfg.channel_def if cfg is not None else {}
        classes = tuple(channels[i] for i in sorted(channels)) if channels else tuple(p.classes)
        if classes != CLASSES:
            raise BundleError(f"{self.loaded.source}: classes must be {list(CLASSES)}, got {list(classes)}")
        self.pipeline: GridPipeline = grid_pipeline(
            cfg, window=p.hu_window, spacing_mm=p.spacing_mm, roi_size=p.roi_size, overlap=p.overlap,
            batch_size=self.batch_size)
        roi = getattr(self.pipeline.inferer, "roi_size", p.roi_size)
        names = tuple(o.name for o in self.manifest.outputs)
        if names != SEGMENT_NAMES:
            raise ManifestError(f"{self.manifest.name}: manifest outputs must be {SEGMENT_NAMES}, got {names}")
        self.expect_output(torch.zeros(1, 1, *(min(int(r), 32) for r in roi)), len(CLASSES))

    def run(self, volume: Volume) -> ModelResult:
        """Segment ``volume``; every declared segment is returned (empty ones are noted)."""
        self.check(volume)
        labels = self.label_map(volume)
        masks = {
            "Body": labels > 0,
            "Right Lung": labels == OUT_RIGHT,
            "Left Lung": labels == OUT_LEFT,
            "Bone": labels == OUT_BONE,
        }
        notes = [f"{self.note()}, pipeline from {self.pipeline.source}"]
        segments = []
        for out in self.manifest.outputs:
            mask = masks[out.name]
            if not mask.any():
                notes.append(f"{out.name}: empty")
            segments.append(Segment(out.name, out.category, out.type, mask, self.spec.laterality(out.name)))
        return ModelResult(
            model_name=self.manifest.name,
            model_version=self.manifest.version,
            segments=tuple(segments),
            notes=tuple(notes),
        )

    def probabilities(self, volume: Volume) -> tuple[torch.Tensor, Orientation]:
        """Class probabilities (4, *work_shape) on the working grid (CPU, float32) and the orientation."""
        pipe = self.pipeline
        orient = Orientation.of(volume.affine)
        canonical = np.asarray(orient.to_canonical(volume.voxels), dtype=np.float32)
        x = pipe.to_input(tensor(canonical)[None, None])
        size = grid_shape(canonical.shape, orient.canonical_spacing(), pipe.spacing_mm)
        x = resample(x, size).contiguous().to(self.device)
        with torch.no_grad(), self.autocast():
            logits = pipe.inferer(x, self.network)
        assert isinstance(logits, torch.Tensor)
        return torch.softmax(logits[0].float(), dim=0).cpu(), orient

    def label_map(self, volume: Volume) -> npt.NDArray[np.uint8]:
        """uint8 map on the input grid: 0 outside, 1 other body tissue, 2 right lung, 3 left lung, 4 bone."""
        probs, orient = self.probabilities(volume)
        can_shape = orient.canonical_shape(volume.voxels.shape)
        side = self._lung_sides(probs, orient, volume.voxels.shape)  # 0 no lung, 1 right, 2 left (work grid)
        work_shape = tuple(int(n) for n in probs.shape[1:])
        out = np.zeros(can_shape, dtype=np.uint8)
        # nearest working voxel of each canonical index (for the side map, resampled in-plane once)
        near = [
            torch.from_numpy(np.minimum((np.arange(n) + 0.5) * m / n, m - 1).astype(np.int64))
            for n, m in zip(can_shape, work_shape, strict=True)
        ]
        side_t = torch.from_numpy(side)[:, near[1]][:, :, near[2]]  # (work z, rows, columns)
        # class -> output value; lung voxels take OUT_RIGHT or OUT_LEFT from the side map (1 or 2)
        lut = torch.tensor([0, OUT_BODY, 0, OUT_BONE], dtype=torch.uint8)
        for slab, values in upsample_chunks(probs, can_shape):
            cls = argmax_channels(values)
            lung_side = side_t[near[0][slab]] + (OUT_RIGHT - 1)
            lab = torch.where(cls == LUNG, lung_side, lut[cls.long()])
            out[slab] = lab.numpy()
        return np.ascontiguousarray(orient.from_canonical(out))

    def _lung_sides(self, probs: torch.Tensor, orient: Orientation, shape: tuple[int, ...]) -> npt.NDArray[np.uint8]:
        """Side of every working voxel (1 right, 2 left) from the nearest kept lung component.

        Small lung components are removed from ``probs`` in place (their lung probability goes to
        the body class).
        """
        cls = probs.argmax(dim=0).numpy()
        work_shape = cls.shape
        can_shape = orient.canonical_shape(shape)
        # world x of every working voxel: canonical affine x row, working -> canonical index
        aff = orient.canonical_affine(shape)
        voxel_ml = abs(np.linalg.det(aff[:3, :3])) / 1000.0 * np.prod(np.asarray(can_shape) / np.asarray(work_shape))
        zc, yc, xc = (work_axis_to_canonical(m, n) for m, n in zip(work_shape, can_shape, strict=True))
        # canonical (z, y, x) index -> (x', y', z') column order of the canonical affine
        wx = (aff[0, 2] * zc)[:, None, None] + (aff[0, 1] * yc)[None, :, None] + (aff[0, 0] * xc)[None, None, :]
        wx = wx + aff[0, 3]
        body = cls != BACKGROUND
        lab, n = ndi.label(body)
        x_mid = 0.0
        if n:
            sizes = np.bincount(lab.ravel(), minlength=n + 1)
            sizes[0] = 0
            x_mid = float(wx[lab == int(np.argmax(sizes))].mean())
        lungs, n_lung = ndi.label(cls == LUNG)
        sizes = np.bincount(lungs.ravel(), minlength=n_lung + 1)
        small = np.flatnonzero(sizes * voxel_ml < self.params.min_lung_ml)
        small = small[small > 0]
        if small.size:
            drop = torch.from_numpy(np.isin(lungs, small))
            probs[BODY][drop] += probs[LUNG][drop]
            probs[LUNG][drop] = 0
        side = np.zeros(work_shape, dtype=np.uint8)
        seeds = np.zeros(work_shape, dtype=bool)
        boxes = ndi.find_objects(lungs)
        for comp_id in sorted(set(range(1, n_lung + 1)) - set(small.tolist())):
            box = boxes[comp_id - 1]
            if box is None:
                continue
            comp = lungs[box] == comp_id
            right = wx[box][comp] < x_mid
            frac = float(right.mean())
            if frac >= 0.9 or frac <= 0.1:
                side[box][comp] = 1 if frac >= 0.5 else 2
            else:
                side[box][comp] = np.where(right, 1, 2)
            seeds[box] |= comp
        if not seeds.any():
            return np.where(wx < x_mid, 1, 2).astype(np.uint8)
        _, nearest = ndi.distance_transform_edt(~seeds, return_indices=True)
        return side[tuple(nearest)]
