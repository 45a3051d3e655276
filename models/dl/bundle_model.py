"""Run a site's segmentation model: a MONAI bundle unchanged, or a TorchScript file.

A **bundle** runs as its ``configs/inference.json|yaml`` says, built by the safe resolver
(:mod:`models.bundle`): its ``preprocessing`` (Orientation, Spacing, ScaleIntensityRange,
CropForeground...), ``network_def`` with the weights of ``models/model.pt``
(``torch.load(weights_only=True)``) or ``models/model.ts``, its ``inferer`` (e.g.
SlidingWindowInferer with its roi, overlap and mode) and its ``postprocessing`` (Activations,
AsDiscrete, KeepLargestConnectedComponent, Invertd back to the source grid...). Only data input
(``LoadImage[d]``: our :class:`Volume` instead) and output writing (``SaveImage[d]``: our SEG) are
replaced. The volume enters as a MONAI ``MetaTensor`` the way ``LoadImage`` would give it: spatial
axes (i, j, k) = (column, row, slice), its affine in RAS (our LPS affine with x and y negated),
no channel (``EnsureChannelFirst`` adds it; without that transform in the bundle, a channel-first
image is given). The postprocessed label map must be back on the source grid (``Invertd``).

A **TorchScript** file is code compiled by its author, loaded with ``torch.jit.load`` and run as it
is (a site's own choice; a bundle config, in contrast, is data checked by the resolver). It gets the
whole volume as a float32 tensor (1, 1, I, J, K) with raw intensities (HU for CT) in the source
voxel order and returns (1, C, I, J, K) scores (argmax over C) or (1, 1, I, J, K) label values.

Each configured label (channel index -> coded name, :mod:`models.site`) becomes one ``Segment``;
a label that is absent from the output is listed in the result's notes.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from models.base import ModelResult, Segment, Volume, check_input
from models.dl.runtime import Precision, autocast, pick_device, tensor
from models.errors import BundleError, ModelOptionsError
from models.site import SiteModel

__all__ = ["BundleSegmentation", "lps_to_ras"]

log = logging.getLogger("models.dl.bundle_model")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(affine: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Our (i, j, k) -> LPS affine as MONAI's (i, j, k) -> RAS affine."""
    return np.asarray(_LPS_TO_RAS @ affine, dtype=np.float64)


def _identity(data: Any) -> Any:
    return data


def _transform_names(compose: Any) -> set[str]:
    return {type(t).__name__ for t in getattr(compose, "transforms", ())}


class BundleSegmentation:
    """A site segmentation model (see the module docstring); built by :func:`models.registry.load`."""

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
        self.site = site
        self.manifest = site.manifest_file().to_manifest()
        self.device = pick_device(device)
        self.precision: Precision = precision
        self.batch_size = batch_size  # the bundle's own inferer settings are kept (run unchanged)
        self.preprocessing: Any = None
        self.inferer: Any = None
        self.postprocessing: Any = None
        self.input_key, self.output_key = "image", "pred"
        self.network: torch.nn.Module
        self.weights = "torchscript"
        self._channel_first = True
        if site.kind == "bundle":
            from models.bundle import BundleConfigError

            try:
                self._load_bundle()
            except BundleConfigError as exc:  # names the config file and key: add the bundle
                raise BundleConfigError(f"{site.source}: {exc}") from None
        else:
            self.network = self._jit_load(site.source)
        self.network.to(self.device).eval()

    def _load_bundle(self) -> None:
        from models.bundle import BundleConfig, load_weights

        root = self.site.source
        cfg = BundleConfig.read(root, overrides={"device": self.device})
        weights, script = root / "models" / "model.pt", root / "models" / "model.ts"
        if weights.is_file():
            network = cfg.network()
            load_weights(network, weights)
            self.network, self.weights = network, "state_dict"
        elif script.is_file():
            self.network = self._jit_load(script)
        else:
            raise BundleError(f"{root}: neither models/model.pt nor models/model.ts")
        self.preprocessing = cfg.preprocessing() if "preprocessing" in cfg else _identity
        self.postprocessing = cfg.postprocessing() if "postprocessing" in cfg else _identity
        if "inferer" in cfg:
            self.inferer = cfg.inferer()
        else:
            from monai.inferers import SimpleInferer

            self.inferer = SimpleInferer()
        self.input_key, self.output_key = cfg.input_key, cfg.output_key
        self._channel_first = not ({"EnsureChannelFirstd", "EnsureChannelFirst"} & _transform_names(self.preprocessing))
        if "Invertd" not in _transform_names(self.postprocessing):
            log.warning("site model %s: postprocessing has no Invertd; the output must already be on the "
                        "source grid", self.site.name)

    def _jit_load(self, path: Any) -> torch.nn.Module:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated",
                                        category=DeprecationWarning)
                module: torch.nn.Module = torch.jit.load(str(path), map_location=self.device)
        except Exception as exc:  # torch raises RuntimeError or ValueError depending on the damage
            raise BundleError(f"{path}: not a TorchScript file: {exc}") from exc
        return module

    def note(self) -> str:
        return f"site model {self.site.kind} {self.site.source.name} ({self.weights}) on {self.device.type}, " \
               f"{self.precision}"

    def check(self, volume: Volume) -> None:
        """Modality, slice count and a usable geometry (any orientation: the bundle reorients)."""
        check_input(self.manifest, volume)

    def run(self, volume: Volume) -> ModelResult:
        with torch.no_grad():
            labelmap = self._run_bundle(volume) if self.site.kind == "bundle" else self._run_torchscript(volume)
        expected = volume.voxels.shape[::-1]
        if labelmap.shape != expected:
            raise BundleError(f"{self.site.source}: the output grid {labelmap.shape} is not the source grid "
                              f"{expected} (the bundle's postprocessing needs Invertd)")
        labels_kji = labelmap.transpose(2, 1, 0)
        segments, notes = [], []
        for lb in self.site.labels:
            mask = labels_kji == lb.index
            if mask.any():
                segments.append(Segment(lb.name, lb.category, lb.type, np.ascontiguousarray(mask), lb.laterality))
            else:
                notes.append(f"{lb.name}: not found")
        return ModelResult(self.manifest.name, self.manifest.version, segments=tuple(segments),
                           notes=(self.note(), *notes))

    def _image(self, volume: Volume) -> Any:
        from monai.data import MetaTensor

        arr = tensor(volume.voxels.transpose(2, 1, 0))
        affine = torch.as_tensor(lps_to_ras(volume.affine), dtype=torch.float64)
        meta: dict[str, Any] = {
            "original_affine": affine.clone(), "spatial_shape": np.asarray(arr.shape), "space": "RAS",
            "original_channel_dim": 0 if self._channel_first else "no_channel", "filename_or_obj": "dicom-series"}
        return MetaTensor(arr[None] if self._channel_first else arr, affine=affine, meta=meta)

    def _run_bundle(self, volume: Volume) -> npt.NDArray[np.int64]:
        data: dict[str, Any] = {self.input_key: self._image(volume)}
        data = self.preprocessing(data)
        image = data[self.input_key]
        batch = torch.as_tensor(image)[None].to(self.device, dtype=torch.float32)
        with autocast(self.device, self.precision):
            pred = self.inferer(batch, self.network)
        if isinstance(pred, tuple | list | dict):
            raise BundleError(f"{self.site.source}: the inferer returned {type(pred).__name__}; a segmentation "
                              "network must return one tensor")
        data[self.output_key] = pred[0].float()
        data = self.postprocessing(data)
        return self._labels(torch.as_tensor(data[self.output_key]))

    def _run_torchscript(self, volume: Volume) -> npt.NDArray[np.int64]:
        x = tensor(volume.voxels.transpose(2, 1, 0))
        with autocast(self.device, self.precision):
            out = self.network(x[None, None].to(self.device))
        if not isinstance(out, torch.Tensor) or out.ndim != 5:
            raise BundleError(f"{self.site.source}: expected a (1, C, I, J, K) tensor from the TorchScript model")
        return self._labels(out[0].float())

    @staticmethod
    def _labels(out: torch.Tensor) -> npt.NDArray[np.int64]:
        """(C, I, J, K) scores -> argmax over C; (1, I, J, K) label values -> rounded."""
        out = out.detach().float().cpu()
        if out.ndim != 4:
            raise BundleError(f"the model output has shape {tuple(out.shape)}, expected (C, I, J, K)")
        if out.shape[0] == 1:
            return np.asarray(torch.round(out[0]).to(torch.int64).numpy())
        return np.asarray(torch.argmax(out, dim=0).numpy())
