"""models.dl.bundle_model: a site model built by the registry runs the spleen bundle's own pre/post-processing
(Orientation, Spacing, ScaleIntensityRange, SlidingWindowInferer, Invertd) and returns masks on the source
grid with left still left; a TorchScript site model runs as it is."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

import torch

from models import registry
from models.base import Code, Volume
from models.errors import BundleError, UnsuitableInput
from models.registry import ModelOptions
from models.site import LabelDef, define

ROOT = Path(__file__).resolve().parents[2]
SPLEEN = ROOT / "tests" / "data" / "bundles" / "spleen_ct_segmentation"
BONE = LabelDef("Bone", Code("85756007", "SCT", "Tissue"), Code("272673000", "SCT", "Bone"))


class Threshold(torch.nn.Module):
    """Two channels (t - x, x - t): label 1 where the input exceeds ``t``."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.t - x, x - self.t], dim=1)


def _script(network: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.script(network).save(str(path))
    return path


@pytest.fixture(autouse=True)
def _no_site_models() -> Iterator[None]:
    yield
    registry.set_site_models([])


def _volume() -> tuple[Volume, np.ndarray]:
    """An off-centre bright block in air, on a grid with flipped columns and rows: (volume, truth)."""
    voxels = np.full((12, 40, 48), -1000.0, dtype=np.float32)  # k, j, i
    voxels[3:9, 8:20, 30:44] = 400.0
    affine = np.array([[-2.0, 0, 0, 60.0], [0, -2.5, 0, 40.0], [0, 0, 3.0, -100.0], [0, 0, 0, 1]])
    uids = tuple(f"1.2.3.{k}" for k in range(12))
    return Volume(voxels, affine, "CT", uids, "1.2.3.99"), voxels > 0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_spleen_bundle_pipeline_returns_masks_on_the_source_grid(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(SPLEEN / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    # the bundle's ScaleIntensityRanged maps -57..164 HU to 0..1: 0.5 is 53.5 HU
    _script(Threshold(0.5), bundle / "models" / "model.ts")
    site = define("spleen-test", family="segmentation", bundle=bundle, modalities=["CT"], labels={1: BONE})
    registry.set_site_models([site])
    model = registry.load("spleen-test", ModelOptions(device="cpu"))
    volume, truth = _volume()
    model.check(volume)
    result = model.run(volume)
    [segment] = result.segments
    assert segment.mask.shape == volume.voxels.shape and segment.name == "Bone"
    score = _dice(segment.mask, truth)
    print(f"bundle pipeline round trip Dice {score:.3f}")
    assert score > 0.9  # resampled to 1.5 x 1.5 x 2 mm and back; mirrored axes would give 0
    with pytest.raises(UnsuitableInput, match="modality"):
        model.check(Volume(volume.voxels, volume.affine, "MR", volume.sop_instance_uids, "1.2.3.99"))


def test_torchscript_site_model_runs_as_it_is(tmp_path: Path) -> None:
    path = _script(Threshold(0.0), tmp_path / "bone.ts")
    lesion = LabelDef("Lesion", Code("49755003", "SCT", "Morphologically Altered Structure"),
                      Code("52988006", "SCT", "Lesion"))
    site = define("bone-ts", family="segmentation", torchscript=path, modalities=["CT"], labels={1: BONE, 2: lesion})
    registry.set_site_models([site])
    model = registry.load("bone-ts", ModelOptions(device="cpu"))
    volume, truth = _volume()
    result = model.run(volume)
    [segment] = result.segments
    assert np.array_equal(segment.mask, truth)
    assert "Lesion: not found" in result.notes


def test_missing_weights_fail_naming_the_bundle(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(SPLEEN / "configs", bundle / "configs")
    site = define("spleen-test", family="segmentation", bundle=bundle, modalities=["CT"])
    registry.set_site_models([site])
    with pytest.raises(BundleError, match=r"neither models/model\.pt nor models/model\.ts"):
        registry.load("spleen-test", ModelOptions(device="cpu"))


@pytest.mark.parametrize("package", ["dl_ct_segmentation", "dl_lung_nodule_detection", "dl_emphysema_classification",
                                     "dl_ct_registration"])
def test_demo_models_are_ordinary_monai_bundles(package: str) -> None:
    """MONAI's own ConfigParser reads the demo bundles and builds the network our resolver builds."""
    from monai.bundle import ConfigParser

    from models.bundle import BundleConfig, load_weights
    from models.dl.core import bundle_dir

    root = bundle_dir(package)
    cfg = BundleConfig.read(root)
    cfg.check()
    assert cfg.channel_def and cfg.output_key == "pred"
    ours = load_weights(cfg.network(), root / "models" / "model.pt")
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    theirs = parser.get_parsed_content("network_def")
    theirs.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    assert type(ours) is type(theirs) and ours.state_dict().keys() == theirs.state_dict().keys()
