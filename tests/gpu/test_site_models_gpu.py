"""A site model (the model zoo's spleen bundle, run unchanged) on CUDA gives what it gives on the CPU.

Marked ``gpu`` and skipped where torch sees no CUDA device. The bundle gets random weights of its own
``network_def`` (as in ``tests/e2e/test_bundle_spleen.py``); its preprocessing, SlidingWindowInferer and
Invertd run on the device, and the label maps on the source grid are compared with the CPU's.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

import torch

from models import registry
from models.registry import ModelOptions
from models.site import define
from testkit.phantom import make_ct_phantom

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SPLEEN = Path(__file__).resolve().parents[2] / "tests" / "data" / "bundles" / "spleen_ct_segmentation"


@pytest.fixture(autouse=True)
def _no_site_models() -> Iterator[None]:
    yield
    registry.set_site_models([])


def test_spleen_bundle_on_cuda_matches_cpu(tmp_path: Path) -> None:
    from models.bundle import BundleConfig

    bundle = tmp_path / "spleen"
    shutil.copytree(SPLEEN, bundle)
    torch.manual_seed(13)
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(BundleConfig.read(bundle).network().state_dict(), bundle / "models" / "model.pt")
    registry.set_site_models([define("spleen-ct", family="segmentation", bundle=bundle, modalities=["CT"])])
    volume = make_ct_phantom(n_slices=24, rows=96, cols=96, pixel_mm=3.0, slice_mm=4.0, seed=7, nodules=0).to_volume()
    masks = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "amp")):
        model = registry.load("spleen-ct", ModelOptions(device=device, precision=precision))  # type: ignore[arg-type]
        result = model.run(volume)
        masks[device, precision] = result.segments[0].mask if result.segments else np.zeros_like(volume.voxels, bool)
    reference = masks["cpu", "fp32"]
    assert reference.any()
    assert np.mean(masks["cuda", "fp32"] == reference) > 0.999
    assert np.mean(masks["cuda", "amp"] == reference) > 0.98
