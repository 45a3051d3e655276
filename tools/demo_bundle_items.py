"""The four demo bundles' parameters and their ordinary MONAI items (used by tools/train_demo_models.py).

Each bundle declares its pipeline as MONAI bundle items (``preprocessing``, ``inferer``, ``postprocessing``),
which the models build through :mod:`models.bundle` and use (:mod:`models.dl.items`); what MONAI items cannot
express stays in the bundle's ``dicom_node`` block (``*_NODE_PARAMS``). ``*_PARAMS`` are the full parameter sets
the networks were trained with. ``python -m tools.train_demo_models --configs-only`` rewrites the shipped
configs from these definitions without retraining.
"""

from __future__ import annotations

from typing import Any

from models.ct_emphysema import GRADES
from models.dl.bundle import network_data_format

# ---------------------------------------------------------------------------------------------
# Parameters the networks were trained with

SEG_PARAMS: dict[str, Any] = {
    "spacing_mm": [3.0, 3.0, 3.0],
    "hu_window": [-1000.0, 1000.0],
    "roi_size": [64, 64, 64],
    "overlap": 0.25,
    "classes": ["background", "body", "lung", "bone"],
    "min_lung_ml": 5.0,
}
DET_PARAMS: dict[str, Any] = {
    "spacing_mm": [2.0, 2.0, 2.0],
    "hu_window": [-1000.0, 400.0],
    "roi_size": [96, 96, 96],
    "overlap": 0.25,
    "score_threshold": 0.25,
    "nms_iou": 0.1,
    "max_detections": 20,
    "diameter_scale_mm": 20.0,
    "min_diameter_mm": 3.0,
}
CLS_PARAMS: dict[str, Any] = {
    "in_shape": [2, 48, 48, 48],
    "hu_window": [-1000.0, -900.0],
    "margin_mm": 5.0,
    "grades": [g.meaning for g in GRADES],
    "min_lung_ml": 100.0,
}
REG_PARAMS: dict[str, Any] = {
    "spacing_mm": 4.5,
    "grid": [80, 80, 80],
    "hu_window": [-1000.0, 1000.0],
    "iterations": 3,
    "angle_scale_deg": 10.0,
    "shift_scale_mm": 30.0,
    "body_hu": -500.0,
}

# ---------------------------------------------------------------------------------------------
# Bundle items


def grid_preprocessing(window: list[float], spacing_mm: list[float]) -> dict[str, Any]:
    """``preprocessing`` of a bundle on a resampled LPS grid: HU window scaled to 0..1, then the working spacing."""
    lo, hi = window
    return {"_target_": "Compose", "transforms": [
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "LPS"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": lo, "a_max": hi, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "Spacingd", "keys": "image", "pixdim": spacing_mm, "mode": "bilinear"},
    ]}


def grid_items(params: dict[str, Any], mode: str) -> dict[str, Any]:
    """``preprocessing`` and ``inferer`` items of a bundle on a resampled grid (models/dl/items.py uses them)."""
    return {
        "preprocessing": grid_preprocessing(params["hu_window"], params["spacing_mm"]),
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": params["roi_size"], "sw_batch_size": 4,
                    "overlap": params["overlap"], "mode": mode},
    }


def seg_items(params: dict[str, Any]) -> dict[str, Any]:
    """The segmentation bundle's ordinary MONAI items: what the model builds through models.bundle and uses."""
    return {
        **grid_items(params, "gaussian"),
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        ]},
    }


def reg_items(params: dict[str, Any]) -> dict[str, Any]:
    """The registration bundle's items: HU window, isotropic working spacing, the centred working grid
    (ResizeWithPadOrCropd: ``grid`` voxels about the scan's centre, padded with 0 = the window's low end) and a
    SimpleInferer (one forward pass of the regressor on the two-channel grid)."""
    pre = grid_preprocessing(params["hu_window"], [params["spacing_mm"]] * 3)
    pre["transforms"].append({"_target_": "ResizeWithPadOrCropd", "keys": "image", "spatial_size": params["grid"]})
    return {"preprocessing": pre, "inferer": {"_target_": "SimpleInferer"}}


SEG_NODE_PARAMS: dict[str, Any] = {"min_lung_ml": SEG_PARAMS["min_lung_ml"]}
"""What stays in the segmentation bundle's ``dicom_node`` block (not expressible as MONAI items)."""
DET_NODE_PARAMS: dict[str, Any] = {
    k: DET_PARAMS[k] for k in ("score_threshold", "nms_iou", "max_detections", "diameter_scale_mm", "min_diameter_mm")
}
"""What stays in the detection bundle's ``dicom_node`` block: heat-map decoding (not expressible as MONAI items)."""
CLS_ITEMS: dict[str, Any] = {
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": CLS_PARAMS["hu_window"][0],
         "a_max": CLS_PARAMS["hu_window"][1], "b_min": 0.0, "b_max": 1.0, "clip": True},
    ]},
    "inferer": {"_target_": "SimpleInferer"},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
    ]},
}
"""The classifier bundle's MONAI items: HU window of the lung channel, SimpleInferer, softmax."""
CLS_NODE_PARAMS: dict[str, Any] = {k: CLS_PARAMS[k] for k in ("in_shape", "margin_mm", "min_lung_ml")}
"""What stays in its ``dicom_node`` block: the lung-box crop (margin, shape) and the minimum lung volume."""
REG_NODE_PARAMS: dict[str, Any] = {k: REG_PARAMS[k] for k in ("iterations", "angle_scale_deg", "shift_scale_mm",
                                                             "body_hu")}
"""What stays in the registration bundle's ``dicom_node`` block: the rigid parameterisation of the network's
six outputs (angle and shift scales), the number of iterations and the body threshold."""

DATA_FORMATS: dict[str, dict[str, Any]] = {
    "dl_ct_segmentation": network_data_format(
        {"0": "CT, HU window -1000..1000 scaled to 0..1, 3 mm grid"}, "segmentation", SEG_PARAMS["classes"],
        SEG_PARAMS["roi_size"]),
    "dl_lung_nodule_detection": network_data_format(
        {"0": "CT, HU window -1000..400 scaled to 0..1, 2 mm grid"}, "regression",
        ["nodule centre heatmap (logit)", "nodule diameter / diameter_scale_mm"], DET_PARAMS["roi_size"]),
    "dl_emphysema_classification": network_data_format(
        {"0": "lung HU, window -1000..-900 scaled to 0..1", "1": "lung mask"}, "classification",
        CLS_PARAMS["grades"], CLS_PARAMS["in_shape"][1:]),
    "dl_ct_registration": network_data_format(
        {"0": "current CT, 4.5 mm grid", "1": "prior CT, same grid"}, "regression",
        ["rotation x", "rotation y", "rotation z", "shift x", "shift y", "shift z"], REG_PARAMS["grid"]),
}
"""metadata.json's ``network_data_format`` of each demo bundle (inputs and outputs with channel_def)."""
BUNDLE_ITEMS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "dl_ct_segmentation": (seg_items(SEG_PARAMS), SEG_NODE_PARAMS),
    "dl_lung_nodule_detection": (grid_items(DET_PARAMS, "constant"), DET_NODE_PARAMS),
    "dl_emphysema_classification": (CLS_ITEMS, CLS_NODE_PARAMS),
    "dl_ct_registration": (reg_items(REG_PARAMS), REG_NODE_PARAMS),
}
"""Every demo bundle's ordinary MONAI items and what is left of its ``dicom_node`` block."""
