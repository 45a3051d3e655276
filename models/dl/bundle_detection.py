"""Run a site's detection model: a MONAI detection bundle (RetinaNet) unchanged, findings as ``Detection``s.

The bundle's ``configs/inference.json|yaml`` is built by the safe resolver (:mod:`models.bundle`), as the
model zoo's ``lung_nodule_ct_detection`` writes it: ``network_def`` (RetinaNet on a ResNet-FPN feature
extractor) with the weights of ``models/model.pt`` (``torch.load(weights_only=True)``), the ``detector``
(``RetinaNetDetector``) configured by the bundle's ``detector_ops`` (target keys, box selector: score
threshold, top-k, NMS, detections per image; sliding-window inferer: roi, overlap, mode), its
``preprocessing`` and its box ``postprocessing`` (``ClipBoxToImaged``, ``AffineBoxToWorldCoordinated``,
``ConvertBoxModed``...).

Replaced: data input (our :class:`Volume` enters as a MONAI ``MetaTensor``, as in
:mod:`models.dl.bundle_model`: LPS -> RAS affine) and the bundle's ``inferer``, which in the zoo is a
script (``scripts.detection_inferer.RetinaNetInferer``, never run): instead the node calls
``detector([image], use_inferer=...)`` itself, with the rule that script applies: the detector's
sliding-window inferer is used when the image has at least as many voxels as its roi (or the bundle's
``inferer`` sets ``force_sliding_window``), else the whole image goes through the network at once.

Boxes come out of the postprocessing in world coordinates: LPS when ``AffineBoxToWorldCoordinated`` has
``affine_lps_to_ras`` (the zoo's setting), else RAS; in the box mode of the last ``ConvertBoxModed``
(the zoo: ``cccwhd``, centre and size). Without ``AffineBoxToWorldCoordinated`` they are taken as
voxel boxes of the preprocessed image. Each box becomes a :class:`Detection`: centre = box centre
(clipped into the source grid; ``centre_lps`` is ``volume.to_patient(centre_ijk)``), bounding box =
the source voxels its corners span, ``diameter_mm`` = the cube root of width x height x depth in mm (the
diameter of the sphere with the volume of the ellipsoid inscribed in the box), ``confidence`` = the
detector's class score (a ranking score). The label is the class index's configured name and code
(:mod:`models.site`, e.g. ``{0: {name: nodule}}``); classes without a label are left out, with a note.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from models.base import Detection, ModelResult, Volume, check_input
from models.dl.runtime import Precision, autocast, pick_device, tensor
from models.errors import BundleError, ModelOptionsError
from models.site import SiteLabel, SiteModel

__all__ = ["BundleDetection"]

log = logging.getLogger("models.dl.bundle_detection")
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
_Floats = npt.NDArray[np.float64]


class BundleDetection:
    """A site detection model (see the module docstring); built by :func:`models.registry.load`."""

    def __init__(
        self,
        site: SiteModel,
        *,
        device: str | torch.device | None = None,
        batch_size: int | None = None,
        precision: Precision = "fp32",
    ) -> None:
        if precision not in ("fp32", "amp"):
            raise ModelOptionsError(f"precision must be 'fp32' or 'amp', got {precision!r}")
        if site.kind != "bundle":
            raise BundleError(f"{site.source}: a detection site model runs from a bundle")
        self.site = site
        self.manifest = site.manifest_file().to_manifest()
        self.device = pick_device(device)
        self.precision: Precision = precision
        self.batch_size = batch_size  # the bundle's own sliding-window settings are kept (run unchanged)
        self.labels: dict[int, SiteLabel] = {lb.index: lb for lb in site.labels}
        from models.bundle import BundleConfigError

        try:
            self._load_bundle()
        except BundleConfigError as exc:  # names the config file and key: add the bundle
            raise BundleConfigError(f"{site.source}: {exc}") from None

    def _load_bundle(self) -> None:
        from models.bundle import BundleConfig, load_weights

        root = self.site.source
        cfg = BundleConfig.read(root, overrides={"device": self.device})
        weights = root / "models" / "model.pt"
        if not weights.is_file():
            raise BundleError(f"{root}: no models/model.pt (a detection bundle's weights)")
        network = load_weights(cfg.network(), weights)
        self.detector: Any = cfg.get("detector")
        if "detector_ops" in cfg:
            cfg.get("detector_ops")  # the setters configure the detector (keys, box selector, inferer)
        self.detector.network.to(self.device).eval()
        self.detector.eval()
        if self.detector.network is not network:
            log.debug("site model %s: the detector's network is not network_def", self.site.name)
        self.preprocessing = cfg.preprocessing() if "preprocessing" in cfg else _identity
        self.postprocessing = cfg.postprocessing() if "postprocessing" in cfg else _identity
        self.force_sliding_window = False
        if "inferer::force_sliding_window" in cfg:
            self.force_sliding_window = bool(cfg.get("inferer::force_sliding_window"))
        self.input_key = cfg.input_key
        self.frame, self.box_mode = _box_output(self.postprocessing)

    def note(self) -> str:
        return f"site model bundle {self.site.source.name} (state_dict) on {self.device.type}, {self.precision}; " \
               "the bundle's inferer is replaced by the detector's own call"

    def check(self, volume: Volume) -> None:
        """Modality, slice count and a usable geometry (any orientation: the bundle reorients)."""
        check_input(self.manifest, volume)

    def run(self, volume: Volume) -> ModelResult:
        """Detections in ``volume``, strongest first."""
        with torch.no_grad():
            boxes, classes, scores = self._predict(volume)
        order = np.argsort(-scores, kind="stable")
        detections: list[Detection] = []
        skipped: set[int] = set()
        for n in order:
            label = self.labels.get(int(classes[n]))
            if label is None:
                skipped.add(int(classes[n]))
                continue
            detections.append(self._detection(volume, boxes[n], float(scores[n]), label, len(detections) + 1))
        threshold = getattr(getattr(self.detector, "box_selector", None), "score_thresh", None)
        notes = [self.note(), f"{len(detections)} candidate(s)" + (f" with score >= {threshold}" if threshold else "")]
        notes += [f"class {c}: no label configured, {int((classes == c).sum())} box(es) left out"
                  for c in sorted(skipped)]
        return ModelResult(self.manifest.name, self.manifest.version, detections=tuple(detections), notes=tuple(notes))

    def _image(self, volume: Volume) -> Any:
        from monai.data import MetaTensor

        from models.dl.bundle_model import lps_to_ras

        arr = tensor(volume.voxels.transpose(2, 1, 0))
        affine = torch.as_tensor(lps_to_ras(volume.affine), dtype=torch.float64)
        meta: dict[str, Any] = {"original_affine": affine.clone(), "spatial_shape": np.asarray(arr.shape),
                                "space": "RAS", "original_channel_dim": "no_channel", "filename_or_obj": "dicom-series"}
        return MetaTensor(arr, affine=affine, meta=meta)

    def _predict(self, volume: Volume) -> tuple[_Floats, npt.NDArray[np.int64], _Floats]:
        """Boxes (N, 6) in LPS mm as (min xyz, max xyz), class indices (N,) and scores (N,)."""
        data: dict[str, Any] = self.preprocessing({self.input_key: self._image(volume)})
        image = data[self.input_key]
        if image.ndim == 3:  # no EnsureChannelFirst in the bundle
            image = image[None]
        det = self.detector
        roi = getattr(det.inferer, "roi_size", None) if getattr(det, "inferer", None) is not None else None
        use_inferer = roi is not None and (self.force_sliding_window or image[0].numel() >= math.prod(roi))
        with autocast(self.device, self.precision):
            pred = det([torch.as_tensor(image).to(self.device, dtype=torch.float32)], use_inferer=use_inferer)[0]
        box_key, label_key, score_key = det.target_box_key, det.target_label_key, det.pred_score_key
        boxes, labels, scores = (pred[k].detach().float().cpu() for k in (box_key, label_key, score_key))
        keep = (boxes[:, 3:] > boxes[:, :3]).all(dim=1)  # empty boxes out here, with their scores
        out = self.postprocessing({box_key: boxes[keep], label_key: labels[keep], self.input_key: image})
        world = np.asarray(torch.as_tensor(out[box_key]).detach().cpu().numpy(), dtype=np.float64).reshape(-1, 6)
        kept_labels = np.asarray(torch.as_tensor(out[label_key]).cpu().numpy()).reshape(-1).astype(np.int64)
        kept_scores = scores[keep].numpy().astype(np.float64)
        if not len(world) == len(kept_labels) == len(kept_scores):
            raise BundleError(f"{self.site.source}: the postprocessing dropped boxes ({len(kept_scores)} -> "
                              f"{len(world)}); their scores cannot be matched")
        return self._to_lps(world, image), kept_labels, kept_scores

    def _to_lps(self, boxes: npt.NDArray[np.float64], image: Any) -> npt.NDArray[np.float64]:
        from monai.data.box_utils import convert_box_mode

        if not len(boxes):
            return boxes
        std = np.asarray(convert_box_mode(boxes, src_mode=self.box_mode, dst_mode="xyzxyz"), dtype=np.float64)
        lo, hi = std[:, :3], std[:, 3:]
        if self.frame == "voxel":  # boxes of the preprocessed image: its affine goes to RAS
            affine = np.asarray(torch.as_tensor(image.affine).cpu().numpy(), dtype=np.float64)
            corners = _corners(lo, hi) @ affine[:3, :3].T + affine[:3, 3]
            lo, hi, frame = corners.min(axis=1), corners.max(axis=1), "RAS"
        else:
            frame = self.frame
        if frame == "RAS":
            lo, hi = np.minimum(lo @ _RAS_TO_LPS, hi @ _RAS_TO_LPS), np.maximum(lo @ _RAS_TO_LPS, hi @ _RAS_TO_LPS)
        return np.concatenate([lo, hi], axis=1)

    def _detection(self, volume: Volume, box: npt.NDArray[np.float64], score: float, label: SiteLabel,
                   number: int) -> Detection:
        lo, hi = box[:3], box[3:]
        inv = np.linalg.inv(volume.affine)
        dims = np.asarray(volume.voxels.shape[::-1], dtype=np.float64) - 1  # largest (i, j, k)
        ijk = _corners(lo[None], hi[None])[0] @ inv[:3, :3].T + inv[:3, 3]
        centre = np.clip((inv[:3, :3] @ ((lo + hi) / 2) + inv[:3, 3]), 0, dims)
        bmin = np.clip(np.floor(ijk.min(axis=0)), 0, dims).astype(int)
        bmax = np.clip(np.ceil(ijk.max(axis=0)), 0, dims).astype(int)
        lps = volume.to_patient(centre)
        slug = re.sub(r"[^a-z0-9]+", "-", label.name.lower()).strip("-") or "finding"
        return Detection(
            label=f"{label.name} {number}", type=label.type,
            centre_ijk=(float(centre[0]), float(centre[1]), float(centre[2])),
            centre_lps=(float(lps[0]), float(lps[1]), float(lps[2])),
            bbox_ijk_min=(int(bmin[0]), int(bmin[1]), int(bmin[2])),
            bbox_ijk_max=(int(bmax[0]), int(bmax[1]), int(bmax[2])),
            diameter_mm=float(np.prod(np.maximum(hi - lo, 0.0)) ** (1 / 3)),
            confidence=float(np.clip(score, 0.0, 1.0)), tracking_id=f"{slug}-{number}",
        )


def _identity(data: Any) -> Any:
    return data


def _corners(lo: npt.NDArray[np.float64], hi: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The 8 corners (N, 8, 3) of boxes given by their min and max corners (N, 3)."""
    pick = np.array([[(c >> a) & 1 for a in range(3)] for c in range(8)], dtype=bool)  # (8, 3)
    return np.where(pick[None], hi[:, None, :], lo[:, None, :])


def _box_output(postprocessing: Any) -> tuple[str, Any]:
    """The frame (``LPS``/``RAS``/``voxel``) and box mode of the boxes the postprocessing returns."""
    frame, mode = "voxel", "xyzxyz"
    for t in getattr(postprocessing, "transforms", ()):
        name = type(t).__name__
        if name == "AffineBoxToWorldCoordinated":
            frame = "LPS" if t.affine_lps_to_ras else "RAS"
        elif name == "ConvertBoxModed":
            mode = t.converter.dst_mode
        elif name == "ConvertBoxToStandardModed":
            mode = "xyzxyz"
    return frame, mode
