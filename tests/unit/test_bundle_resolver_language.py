"""models.bundle: the config language beyond the spleen file (forms other zoo bundles use)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from models.bundle import BundleConfig, BundleConfigError


def _bundle(root: Path, config: dict[str, Any], **others: Any) -> Path:
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    for name, content in others.items():
        (root / "configs" / name.replace("__", ".")).write_text(json.dumps(content))
    return root


def test_references_relative_ids_and_macros(tmp_path: Path) -> None:
    cfg = BundleConfig.read(_bundle(tmp_path, {
        "a": 2, "b": 3,
        "sum": "$@a + @b",
        "group": {"x": 10, "same_level": "@::x", "up": "@::::a", "list": [1, "@::0"], "expr": "$@::x * 2"},
        "copy": "%group",                        # a macro: a copy of the raw config
        "old_sep": "@group#list#0",
        "from_file": "%common.json::net::channels",
        "from_configs_dir": "%configs/common.json#net#channels",
    }, common__json={"net": {"channels": [8, 16]}}))
    assert cfg.get("sum") == 5
    assert cfg.get("group") == {"x": 10, "same_level": 10, "up": 2, "list": [1, 1], "expr": 20}
    assert cfg.raw("group::same_level") == "@group::x"
    assert cfg.get("copy") == cfg.get("group") and cfg.get("copy") is not cfg.get("group")
    assert cfg.get("old_sep") == 1
    assert cfg.get("from_file") == [8, 16] == cfg.get("from_configs_dir")
    assert "group::list::1" in cfg and "group::nope" not in cfg


def test_desc_requires_and_disabled(tmp_path: Path) -> None:
    pytest.importorskip("monai")
    cfg = BundleConfig.read(_bundle(tmp_path, {
        "use_pad": False,
        "pre": {"_target_": "Compose", "_desc_": "free text, ignored", "_requires_": ["@dev", "$@dev"],
                "transforms": [
                    {"_target_": "EnsureChannelFirstd", "keys": "image"},
                    {"_target_": "SpatialPadd", "keys": "image", "spatial_size": [8, 8, 8],
                     "_disabled_": "$not @use_pad"},
                    {"_target_": "monai.transforms.intensity.dictionary.NormalizeIntensityd", "keys": "image",
                     "nonzero": True},
                    {"_target_": "ScaleIntensityD", "keys": "image", "minv": -1.0, "maxv": 1.0},
                ]},
        "dev": "$torch.device('cpu')",
    }))
    cfg.check("pre")
    names = [type(t).__name__ for t in cfg.get("pre").transforms]
    assert names == ["EnsureChannelFirstd", "NormalizeIntensityd", "ScaleIntensityd"]


def test_long_target_spellings_must_be_the_same_object(tmp_path: Path) -> None:
    pytest.importorskip("monai")
    cfg = BundleConfig.read(_bundle(tmp_path, {
        "ok": {"_target_": "monai.networks.nets.unet.UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
               "channels": [4, 8], "strides": [2]},
        "fake": {"_target_": "monai.networks.nets.basic_unet.UNet"},
        "missing": {"_target_": "monai.networks.nope.UNet"},
    }))
    assert type(cfg.get("ok")).__name__ == "UNet"
    with pytest.raises(BundleConfigError, match=r"fake: _target_ 'monai.networks.nets.basic_unet.UNet' cannot be"):
        cfg.get("fake")
    with pytest.raises(BundleConfigError, match=r"missing: _target_ 'monai.networks.nope.UNet' cannot be loaded"):
        cfg.get("missing")


def test_weights_path(tmp_path: Path) -> None:
    assert BundleConfig.read(_bundle(tmp_path, {})).weights_path() == tmp_path / "models" / "model.pt"
    cfg = BundleConfig.read(_bundle(tmp_path, {"checkpointloader": {"load_path": "$os.path.join('m', 'x.pt')"}}))
    assert cfg.weights_path() == tmp_path / "models" / "model.pt"  # outside the grammar: the usual place
    cfg = BundleConfig.read(_bundle(tmp_path, {"checkpointloader": {"load_path": "models/fold0.pt"}}))
    assert cfg.weights_path() == tmp_path / "models" / "fold0.pt"
    cfg = BundleConfig.read(_bundle(tmp_path, {"checkpointloader": {"load_path": "$@bundle_root + '/../x.pt'"}}))
    with pytest.raises(BundleConfigError, match=r"checkpointloader::load_path: .* is outside the bundle"):
        cfg.weights_path()


def test_target_given_by_an_expression_or_reference(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    cfg = BundleConfig.read(_bundle(tmp_path, {
        "cls": "$torch.device", "by_expr": {"_target_": "$torch.device", "type": "cpu"},
        "by_ref": {"_target_": "@cls", "type": "cpu"}, "not_callable": {"_target_": "$'os.system'"},
    }))
    assert cfg.get("by_expr") == torch.device("cpu") == cfg.get("by_ref")
    with pytest.raises(BundleConfigError, match=r"not_callable: _target_ \"\$'os.system'\" is not an allowed callable"):
        cfg.get("not_callable")


def test_bad_constructor_arguments_name_the_key(tmp_path: Path) -> None:
    pytest.importorskip("monai")
    cfg = BundleConfig.read(_bundle(tmp_path, {"net": {"_target_": "UNet", "spatial_dims": 3, "bogus": 1}}))
    with pytest.raises(BundleConfigError, match=r"inference.json: net: building UNet failed: TypeError"):
        cfg.get("net")


def test_overrides_and_object_overrides(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    cpu = torch.device("cpu")
    cfg = BundleConfig.read(_bundle(tmp_path, {
        "device": "$torch.device('cuda:0')", "network_def": {"_target_": "BasicUNet", "spatial_dims": 2,
                                                              "features": [4, 4, 8, 8, 16, 4]},
        "network": "$@network_def.to(@device)",
    }), overrides={"device": cpu, "network_def::out_channels": 3})
    assert cfg.get("device") is cpu
    net = cfg.get("network")
    assert net is cfg.network() and net.final_conv.out_channels == 3
    with pytest.raises(BundleConfigError, match=r"override 'a::b': no such item"):
        BundleConfig.read(tmp_path, overrides={"a::b": 1})


# The lung nodule detection bundle's forms (configs/inference.json of the MONAI model zoo's
# lung_nodule_ct_detection): networks built by expressions, a detector configured by method calls.
DETECTION: dict[str, Any] = {
    "imports": ["$import glob", "$import numpy", "$import os", "$import torch"],
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "spatial_dims": 3, "num_classes": 1, "size_divisible": [16, 16, 8], "infer_patch_size": [512, 512, 192],
    "anchor_generator": {"_target_": "monai.apps.detection.utils.anchor_utils.AnchorGeneratorWithAnchorShape",
                         "feature_map_scales": [1, 2, 4], "base_anchor_shapes": [[6, 8, 4], [8, 6, 5], [10, 10, 6]]},
    "backbone": "$monai.networks.nets.resnet.resnet50(spatial_dims=3,n_input_channels=1,conv1_t_stride=[2,2,1],"
                "conv1_t_size=[7,7,7])",
    "feature_extractor": "$monai.apps.detection.networks.retinanet_network.resnet_fpn_feature_extractor(@backbone,3,"
                         "False,[1,2],None)",
    "network_def": {"_target_": "RetinaNet", "spatial_dims": "@spatial_dims", "num_classes": "@num_classes",
                    "num_anchors": 3, "feature_extractor": "@feature_extractor", "size_divisible": "@size_divisible",
                    "use_list_output": False},
    "network": "$@network_def.to(@device)",
    "detector": {"_target_": "RetinaNetDetector", "network": "@network", "anchor_generator": "@anchor_generator",
                 "debug": False, "spatial_dims": "@spatial_dims", "num_classes": "@num_classes",
                 "size_divisible": "@size_divisible"},
    "detector_ops": [
        "$@detector.set_target_keys(box_key='box', label_key='label')",
        "$@detector.set_box_selector_parameters(score_thresh=0.02,topk_candidates_per_level=1000,nms_thresh=0.22,"
        "detections_per_img=300)",
        "$@detector.set_sliding_window_inferer(roi_size=@infer_patch_size,overlap=0.25,sw_batch_size=1,"
        "mode='constant',device='cpu')",
    ],
    "whether_raw_luna16": False,
    "whether_resampled_luna16": "$(not @whether_raw_luna16)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image", "meta_key_postfix": "meta_dict",
         "_disabled_": "@whether_raw_luna16"},
        {"_target_": "LoadImaged", "keys": "image", "meta_key_postfix": "meta_dict", "reader": "itkreader",
         "affine_lps_to_ras": True, "_disabled_": "@whether_resampled_luna16"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},  # the zoo's "meta_key_postfix" is gone in MONAI 1.6
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [0.703125, 0.703125, 1.25],
         "_disabled_": "@whether_resampled_luna16"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1024.0, "a_max": 300.0, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "EnsureTyped", "keys": "image"},
    ]},
    "inferer": {"_target_": "scripts.detection_inferer.RetinaNetInferer", "detector": "@detector",
                "force_sliding_window": False},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "ClipBoxToImaged", "box_keys": "box", "label_keys": "label", "box_ref_image_keys": "image",
         "remove_empty": True},
        {"_target_": "AffineBoxToWorldCoordinated", "box_keys": "box", "box_ref_image_keys": "image",
         "affine_lps_to_ras": True},
        {"_target_": "ConvertBoxModed", "box_keys": "box", "src_mode": "xyzxyz", "dst_mode": "cccwhd"},
        {"_target_": "DeleteItemsd", "keys": ["image"]},
    ]},
}


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_detection_bundle_forms_build(tmp_path: Path) -> None:
    """Networks from expressions, transforms from a detection package; the bundle's inferer script is refused."""
    pytest.importorskip("monai")
    cfg = BundleConfig.read(_bundle(tmp_path, DETECTION), overrides={"device": "$torch.device('cpu')"})
    cfg.check("network_def", "detector_ops", "preprocessing", "postprocessing")
    assert type(cfg.get("anchor_generator")).__name__ == "AnchorGeneratorWithAnchorShape"
    backbone = cfg.get("backbone")
    assert type(backbone).__name__ == "ResNet" and backbone.conv1.stride == (2, 2, 1)
    assert [type(t).__name__ for t in cfg.postprocessing().transforms] == [
        "ClipBoxToImaged", "AffineBoxToWorldCoordinated", "ConvertBoxModed", "DeleteItemsd"]
    assert [type(t).__name__ for t in cfg.preprocessing().transforms] == [  # Spacingd: "_disabled_" by reference
        "EnsureChannelFirstd", "Orientationd", "ScaleIntensityRanged", "EnsureTyped"]
    assert [(r.id, r.target) for r in cfg.replaced] == [("preprocessing::transforms::0", "LoadImaged")]
    with pytest.raises(BundleConfigError, match=r"inferer: _target_ 'scripts.detection_inferer.RetinaNetInferer'"):
        cfg.inferer()


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_detection_bundle_detector_is_configured_by_its_method_calls(tmp_path: Path) -> None:
    """RetinaNet and the detector's setters (MONAI's FPN feature extractor, which needs torchvision, is built by
    our torchvision-free stand-in: models.bundle.compat)."""
    pytest.importorskip("monai")
    cfg = BundleConfig.read(_bundle(tmp_path, DETECTION), overrides={"device": "$torch.device('cpu')"})
    assert cfg.get("detector_ops") == [None, None, None]
    detector = cfg.get("detector")
    assert type(detector).__name__ == "RetinaNetDetector"
    assert detector.network is cfg.get("network") is cfg.network()
    assert (detector.box_selector.score_thresh, detector.box_selector.nms_thresh) == (0.02, 0.22)
    assert list(detector.inferer.roi_size) == [512, 512, 192]


def test_segresnet_and_list_postprocessing(tmp_path: Path) -> None:
    """Whole-body CT forms: SegResNet, conditional ``pixdim``, ``#`` references into a settings dict, an inferer
    with a device expression, the weights file named by ``checkpointloader``; a bare list of transforms."""
    pytest.importorskip("monai")
    cfg = BundleConfig.read(_bundle(tmp_path, {
        "displayable_configs": {"highres": True, "sw_overlap": 0.25, "sw_batch_size": 1},
        "pixdim": "$[1.5, 1.5, 1.5] if @displayable_configs#highres else [3.0, 3.0, 3.0]",
        "modelname": "$'model.pt' if @displayable_configs#highres else 'model_lowres.pt'",
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/' + @modelname",
                             "load_dict": {"model": "@network"}},
        "network_def": {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 105,
                        "init_filters": 8, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "dropout_prob": 0.2},
        "preprocessing": [{"_target_": "Spacingd", "keys": "image", "pixdim": "@pixdim", "mode": "bilinear"}],
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 96],
                    "sw_batch_size": "@displayable_configs#sw_batch_size", "overlap": "@displayable_configs#sw_overlap",
                    "padding_mode": "replicate", "mode": "gaussian", "device": "$torch.device('cpu')"},
        "postprocessing": [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                           {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
                           {"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": [1]},
                           {"_target_": "SaveImaged", "keys": "pred", "output_dir": "/tmp/x"}],
    }))
    assert cfg.network().conv_final[-1].conv.out_channels == 105
    assert cfg.preprocessing().transforms[0].spacing_transform.pixdim.tolist() == [1.5, 1.5, 1.5]
    assert (cfg.inferer().mode, str(cfg.inferer().device), cfg.inferer().overlap) == ("gaussian", "cpu", 0.25)
    assert cfg.weights_path() == tmp_path / "models" / "model.pt"
    assert [type(t).__name__ for t in cfg.postprocessing().transforms] == [
        "Activationsd", "AsDiscreted", "KeepLargestConnectedComponentd"]
    assert [(r.id, r.target) for r in cfg.replaced] == [("postprocessing::3", "SaveImaged")]
