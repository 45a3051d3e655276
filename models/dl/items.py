"""What a demo model on a resampled working grid takes from its bundle's ordinary MONAI items.

A demo bundle declares its pipeline the way any MONAI bundle does (``preprocessing``: EnsureChannelFirstd,
Orientationd, ScaleIntensityRanged, Spacingd; ``inferer``: SlidingWindowInferer; ``postprocessing``:
Activationsd, Invertd, AsDiscreted). The models build those items through the safe resolver
(:mod:`models.bundle`) and use them: the built ``ScaleIntensityRange`` maps HU to the network's input, the
built inferer runs the network, Spacingd's ``pixdim`` is the working spacing. The node keeps two steps of
its own where it must stay exact and bounded in memory: resampling to the working grid is area-averaged
(anti-aliased, as the networks were trained; MONAI's Spacingd interpolates), and the class probabilities
go back to the source grid slab by slab (what Invertd does, at a fraction of its memory). The axcodes of
Orientationd must be the node's canonical ``LPS``.

A bundle (or TorchScript file) without these items keeps working from its ``dicom_node`` parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models.bundle import BundleConfig
from models.dl.runtime import hu_to_unit
from models.errors import BundleError

Scale = Callable[[torch.Tensor], torch.Tensor]


def transforms_by_name(compose: Any) -> dict[str, Any]:
    """The transforms of a built ``Compose`` by class name (the first of each)."""
    out: dict[str, Any] = {}
    for t in getattr(compose, "transforms", ()):
        out.setdefault(type(t).__name__, t)
    return out


@dataclass(frozen=True)
class GridPipeline:
    """Intensity scaling, working spacing and inferer of a model on a resampled grid."""

    scale: Scale
    spacing_mm: tuple[float, float, float]
    inferer: Callable[..., Any]
    source: str  # "bundle items" or "dicom_node"

    def to_input(self, hu: torch.Tensor) -> torch.Tensor:
        """HU (any shape) -> the network's input intensities as a plain float32 tensor."""
        return torch.as_tensor(self.scale(hu)).as_subclass(torch.Tensor).float()


def grid_pipeline(
    cfg: BundleConfig | None,
    *,
    window: Sequence[float],
    spacing_mm: Sequence[float],
    roi_size: Sequence[int],
    overlap: float,
    batch_size: int,
    mode: str = "gaussian",
) -> GridPipeline:
    """From the bundle's ``preprocessing`` and ``inferer`` items when it has both, else from the legacy
    ``dicom_node`` values given here (``mode``: the legacy blending). ``batch_size`` (the node's option) sets
    the inferer's sw_batch_size."""
    if cfg is None or "preprocessing" not in cfg or "inferer" not in cfg:
        from monai.inferers import SlidingWindowInferer

        lo, hi = float(window[0]), float(window[1])
        inferer = SlidingWindowInferer(list(roi_size), batch_size, overlap, mode=mode)
        return GridPipeline(lambda t: hu_to_unit(t, (lo, hi)), _triple(spacing_mm), inferer, "dicom_node")
    found = transforms_by_name(cfg.preprocessing())
    where = cfg.where("preprocessing")
    orient = found.get("Orientationd")
    if orient is not None and str(orient.ornt_transform.axcodes) != "LPS":
        raise BundleError(f"{where}: Orientationd axcodes must be 'LPS' (the node's canonical orientation), "
                          f"got {orient.ornt_transform.axcodes!r}")
    for name in ("ScaleIntensityRanged", "Spacingd"):
        if name not in found:
            raise BundleError(f"{where}: a {name} transform is required")
    spacing = _triple(found["Spacingd"].spacing_transform.pixdim)
    inferer = cfg.inferer()
    if not callable(inferer):
        raise BundleError(f"{cfg.where('inferer')}: builds a {type(inferer).__name__}, not an inferer")
    if hasattr(inferer, "sw_batch_size"):
        inferer.sw_batch_size = batch_size
    if "postprocessing" in cfg:
        cfg.postprocessing()  # built (checked); the node applies its softmax + inversion slab by slab
    return GridPipeline(found["ScaleIntensityRanged"].scaler, spacing, inferer, "bundle items")


def _triple(values: Any) -> tuple[float, float, float]:
    v = [float(x) for x in values]
    if len(v) == 1:
        v = v * 3
    if len(v) != 3 or min(v) <= 0:
        raise BundleError(f"the working spacing must be three positive numbers, got {v}")
    return v[0], v[1], v[2]
