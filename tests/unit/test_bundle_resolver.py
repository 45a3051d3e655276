"""models.bundle: the real spleen bundle's configs read, check and build unchanged with the safe resolver."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.bundle import BundleConfig, BundleConfigError, Replaced

ROOT = Path(__file__).resolve().parents[2]
SPLEEN = ROOT / "tests" / "data" / "bundles" / "spleen_ct_segmentation"


def test_the_spleen_configs_are_the_published_ones() -> None:
    """The copy in tests/data is the zoo's file set (configs + LICENSE), not an edited version."""
    names = sorted(p.name for p in (SPLEEN / "configs").iterdir())
    assert names == ["evaluate.json", "inference.json", "inference_trt.json", "logging.conf", "metadata.json",
                     "multi_gpu_evaluate.json", "multi_gpu_train.json", "train.json"]
    assert "Apache License" in (SPLEEN / "LICENSE").read_text()
    assert json.loads((SPLEEN / "configs" / "inference.json").read_text())["network_def"]["_target_"] == "UNet"


def test_reading_and_checking_need_neither_torch_nor_monai() -> None:
    code = (
        "import sys\n"
        "from models.bundle import BundleConfig\n"
        f"cfg = BundleConfig.read({str(SPLEEN)!r})\n"
        "cfg.check()\n"
        "print(cfg.channel_def, cfg.input_key, cfg.output_key)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'monai'))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "{0: 'background', 1: 'spleen'} image pred"


def test_metadata() -> None:
    cfg = BundleConfig.read(SPLEEN)
    assert cfg.name == "Spleen CT segmentation"
    assert cfg.version == "0.5.9"
    assert cfg.metadata["network_data_format"]["inputs"]["image"]["modality"] == "CT"
    assert cfg.raw("inferer")["roi_size"] == [96, 96, 96]
    assert cfg.get("bundle_root") == str(SPLEEN)
    assert cfg.get("output_dir") == f"{SPLEEN}/eval"  # "$@bundle_root + '/eval'"


def test_the_items_a_runner_does_not_use_are_refused_when_asked_for() -> None:
    """The evaluator, data loader, glob of a dataset and determinism call are never built (or needed)."""
    cfg = BundleConfig.read(SPLEEN)
    with pytest.raises(BundleConfigError, match=r"inference.json: datalist: name 'glob' is not allowed"):
        cfg.get("datalist")
    with pytest.raises(BundleConfigError, match=r"inference.json: evaluator: _target_ 'SupervisedEvaluator'"):
        cfg.check("evaluator")
    with pytest.raises(BundleConfigError, match=r"initialize::0: 'monai.utils.set_determinism' is not allowed"):
        cfg.get("initialize")
    assert cfg.get("imports") == [None, None, None]  # "$import glob" & co. are never executed


@pytest.fixture(scope="module")
def spleen() -> BundleConfig:
    """The spleen config, built with torch and MONAI (the tests using it are skipped without them)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("monai")
    return BundleConfig.read(SPLEEN, overrides={"device": torch.device("cpu")})


def test_network_def_is_the_files_unet(spleen: BundleConfig) -> None:
    from monai.networks.nets import UNet

    net = spleen.network()
    assert type(net) is UNet
    assert (net.in_channels, net.out_channels) == (1, 2)
    assert (list(net.channels), list(net.strides), net.num_res_units, net.norm) == (
        [16, 32, 64, 128, 256], [2, 2, 2, 2], 2, "batch")
    assert spleen.get("network") is net  # "$@network_def.to(@device)" on the overridden CPU device
    assert spleen.channel_def == {0: "background", 1: "spleen"}


def test_preprocessing_has_the_files_transforms_with_their_arguments(spleen: BundleConfig) -> None:
    from monai.transforms import Compose

    pre = spleen.preprocessing()
    assert type(pre) is Compose
    names = [type(t).__name__ for t in pre.transforms]
    assert names == ["EnsureChannelFirstd", "Orientationd", "Spacingd", "ScaleIntensityRanged", "EnsureTyped"]
    first, orient, spacing, scale, _ = pre.transforms
    assert first.keys == ("image",)  # "@image_key"
    assert orient.ornt_transform.axcodes == "RAS"
    assert spacing.spacing_transform.pixdim.tolist() == [1.5, 1.5, 2.0]
    assert spacing.mode == ("bilinear",)
    assert (scale.scaler.a_min, scale.scaler.a_max, scale.scaler.b_min, scale.scaler.b_max, scale.scaler.clip) == (
        -57, 164, 0, 1, True)
    assert Replaced("preprocessing::transforms::0", "LoadImaged",
                    "data input is the node's (the loaded DICOM series with its affine)") in spleen.replaced


def test_inferer_is_the_files_sliding_window(spleen: BundleConfig) -> None:
    from monai.inferers import SlidingWindowInferer

    inferer = spleen.inferer()
    assert type(inferer) is SlidingWindowInferer
    assert (inferer.roi_size, inferer.sw_batch_size, inferer.overlap) == ([96, 96, 96], 4, 0.5)


def test_postprocessing_inverts_the_very_preprocessing(spleen: BundleConfig) -> None:
    post = spleen.postprocessing()
    names = [type(t).__name__ for t in post.transforms]
    assert names == ["Activationsd", "Invertd", "AsDiscreted"]
    activations, invert, discrete = post.transforms
    assert activations.softmax == (True,)
    assert invert.transform is spleen.preprocessing()  # one object for both references
    assert (invert.orig_keys, invert.nearest_interp) == (("image",), (False,))
    assert discrete.argmax == (True,)
    assert [r.target for r in spleen.replaced] == ["LoadImaged", "SaveImaged"]
    assert spleen.replaced[1].id == "postprocessing::transforms::3"


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_the_same_objects_as_monais_own_parser(spleen: BundleConfig) -> None:
    """MONAI's ConfigParser (which evals; fine on this known file) builds the same network and transforms."""
    from monai.bundle import ConfigParser

    theirs = ConfigParser()
    theirs.read_config(str(SPLEEN / "configs" / "inference.json"))
    their_net = theirs.get_parsed_content("network_def")
    ours = {k: tuple(v.shape) for k, v in spleen.network().state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in their_net.state_dict().items()}
    their_pre = [type(t).__name__ for t in theirs.get_parsed_content("preprocessing").transforms]
    assert their_pre[0] == "LoadImaged"
    assert their_pre[1:] == [type(t).__name__ for t in spleen.preprocessing().transforms]
    their_inferer = theirs.get_parsed_content("inferer")
    assert (their_inferer.roi_size, their_inferer.overlap) == (spleen.inferer().roi_size, spleen.inferer().overlap)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_the_built_chain_runs_and_inverts_to_the_source_grid(spleen: BundleConfig) -> None:
    """Our volume in place of LoadImaged: preprocessing, random weights, the inferer and postprocessing give
    a label map on the source grid (noise, but with the source's shape and affine)."""
    import torch
    from monai.data import MetaTensor

    torch.manual_seed(0)
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    affine[:3, 3] = (-100.0, -120.0, 40.0)
    image = MetaTensor(torch.randn(40, 36, 12) * 100, affine=torch.as_tensor(affine),
                       meta={"original_channel_dim": "no_channel", "filename_or_obj": "series"})
    data = spleen.preprocessing()({"image": image})
    assert data["image"].shape[0] == 1
    network = spleen.network().eval()
    with torch.no_grad():
        data["pred"] = spleen.inferer()(data["image"][None], network)[0]
    assert data["pred"].shape[0] == 2
    out = spleen.postprocessing()(data)
    pred = out["pred"]
    assert tuple(pred.shape) == (1, 40, 36, 12)
    assert set(np.unique(pred.numpy())) <= {0.0, 1.0}
    np.testing.assert_allclose(pred.affine.numpy(), affine, atol=1e-5)


def test_yaml_configs_merge_and_override(tmp_path: Path, spleen: BundleConfig) -> None:
    """A YAML config file, a second file overriding nested keys with the old ``#`` separator, overrides."""
    bundle = tmp_path / "b"
    shutil.copytree(SPLEEN / "configs", bundle / "configs")
    (bundle / "configs" / "site.yaml").write_text("inferer#overlap: 0.25\nimage_key: img\n")
    cfg = BundleConfig.read(bundle, ["inference", "site.yaml"], overrides={"inferer::sw_batch_size": 1})
    assert (cfg.inferer().overlap, cfg.inferer().sw_batch_size) == (0.25, 1)
    assert cfg.preprocessing().transforms[0].keys == ("img",)
    assert cfg.where("inferer") == "inference.json: inferer"
    with pytest.raises(BundleConfigError, match=r"no configs/missing"):
        BundleConfig.read(bundle, "missing")
