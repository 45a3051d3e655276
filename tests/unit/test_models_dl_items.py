"""The demo bundles declare their pipelines as ordinary MONAI items and the models use them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from monai.inferers import SlidingWindowInferer  # noqa: E402

from models.base import Volume  # noqa: E402
from models.dl.core import bundle_dir  # noqa: E402
from models.dl_ct_segmentation.model import DlCtSegmentation  # noqa: E402
from models.errors import BundleError  # noqa: E402
from testkit.phantom import make_ct_phantom  # noqa: E402

SEG = bundle_dir("dl_ct_segmentation")


@pytest.fixture(scope="module")
def volume() -> Volume:
    return make_ct_phantom(16, 64, 64, pixel_mm=4.8, slice_mm=10.0, seed=5, nodules=0).to_volume()


@pytest.fixture(scope="module")
def reference(volume: Volume) -> np.ndarray:
    return DlCtSegmentation(device="cpu").label_map(volume)


def _copy(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    root = tmp_path / "seg"
    shutil.copytree(SEG, root)
    return root, json.loads((root / "configs" / "inference.json").read_text())


def _write(root: Path, inference: dict[str, Any]) -> Path:
    (root / "configs" / "inference.json").write_text(json.dumps(inference))
    return root


def test_shipped_bundle_declares_and_uses_monai_items() -> None:
    inference = json.loads((SEG / "configs" / "inference.json").read_text())
    assert {"preprocessing", "inferer", "postprocessing"} <= inference.keys()
    assert inference["dicom_node"] == {"min_lung_ml": 5.0}  # only what MONAI items cannot express
    model = DlCtSegmentation(device="cpu", batch_size=2)
    assert model.pipeline.source == "bundle items"
    assert model.pipeline.spacing_mm == (3.0, 3.0, 3.0)
    inferer = model.pipeline.inferer
    assert isinstance(inferer, SlidingWindowInferer)
    assert (np.asarray(inferer.roi_size).tolist(), inferer.overlap, inferer.sw_batch_size) == ([64, 64, 64], 0.25, 2)


def test_the_bundle_items_drive_the_model(tmp_path: Path, volume: Volume, reference: np.ndarray) -> None:
    root, inference = _copy(tmp_path)
    inference["inferer"]["roi_size"] = [32, 32, 32]
    model = DlCtSegmentation(_write(root, inference), device="cpu")
    seen: list[tuple[int, ...]] = []
    model.network.register_forward_hook(lambda _m, args, _o: seen.append(tuple(args[0].shape[2:])))
    model.label_map(volume)
    assert seen and all(s == (32, 32, 32) for s in seen)
    inference["inferer"]["roi_size"] = [64, 64, 64]
    scale = next(t for t in inference["preprocessing"]["transforms"] if t["_target_"] == "ScaleIntensityRanged")
    scale.update(a_min=2000.0, a_max=3000.0)  # every voxel below the window: the input is all zeros
    spacing = next(t for t in inference["preprocessing"]["transforms"] if t["_target_"] == "Spacingd")
    spacing["pixdim"] = [4.0, 4.0, 4.0]
    model = DlCtSegmentation(_write(root, inference), device="cpu")
    assert model.pipeline.spacing_mm == (4.0, 4.0, 4.0)
    assert np.mean(model.label_map(volume) == reference) < 0.9


def test_legacy_dicom_node_bundle_gives_the_same_labels(
    tmp_path: Path, volume: Volume, reference: np.ndarray
) -> None:
    """The old format (all parameters in dicom_node, no items) still works and agrees with the items."""
    root, inference = _copy(tmp_path)
    legacy = {k: inference[k] for k in ("device", "network_def", "network")}
    legacy["dicom_node"] = {"spacing_mm": [3.0, 3.0, 3.0], "hu_window": [-1000.0, 1000.0], "roi_size": [64, 64, 64],
                            "overlap": 0.25, "classes": ["background", "body", "lung", "bone"], "min_lung_ml": 5.0}
    model = DlCtSegmentation(_write(root, legacy), device="cpu")
    assert model.pipeline.source == "dicom_node"
    assert np.mean(model.label_map(volume) == reference) > 0.999


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda t: t[1].update(axcodes="RAS"), "axcodes must be 'LPS'"),
        (lambda t: t.pop(3), "a Spacingd transform is required"),
        (lambda t: t[2].update(_target_="os.system"), "'os.system' is not allowed"),
    ],
)
def test_bad_items_are_refused(tmp_path: Path, edit: Any, needle: str) -> None:
    root, inference = _copy(tmp_path)
    edit(inference["preprocessing"]["transforms"])
    with pytest.raises(BundleError, match=needle):
        DlCtSegmentation(_write(root, inference), device="cpu")


def test_class_names_come_from_channel_def(tmp_path: Path) -> None:
    root, _ = _copy(tmp_path)
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    meta["network_data_format"]["outputs"]["pred"]["channel_def"]["3"] = "marrow"
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="marrow"):
        DlCtSegmentation(root, device="cpu")


GRID = ["EnsureChannelFirstd", "Orientationd", "ScaleIntensityRanged", "Spacingd"]


@pytest.mark.parametrize(
    ("package", "inferer", "transforms"),
    [
        ("dl_ct_segmentation", "SlidingWindowInferer", GRID),
        ("dl_lung_nodule_detection", "SlidingWindowInferer", GRID),
        ("dl_emphysema_classification", "SimpleInferer", ["ScaleIntensityRanged"]),
        ("dl_ct_registration", "SimpleInferer", [*GRID, "ResizeWithPadOrCropd"]),
    ],
)
def test_monai_builds_the_same_items(package: str, inferer: str, transforms: list[str]) -> None:
    """MONAI's own ConfigParser builds the converted bundles' items (they are ordinary bundle items)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_dir(package) / "configs" / "inference.json"))
    assert type(parser.get_parsed_content("inferer")).__name__ == inferer
    assert [type(t).__name__ for t in parser.get_parsed_content("preprocessing").transforms] == transforms


def test_emphysema_classifier_uses_its_items() -> None:
    from models.dl_emphysema_classification.model import DlEmphysemaClassification

    inference = json.loads((bundle_dir("dl_emphysema_classification") / "configs" / "inference.json").read_text())
    assert set(inference["dicom_node"]) == {"in_shape", "margin_mm", "min_lung_ml"}
    model = DlEmphysemaClassification(device="cpu")
    assert model.pipeline_source == "bundle items" and type(model.inferer).__name__ == "SimpleInferer"
    assert model.grades == ("Absent", "Mild", "Moderate", "Severe") and model.scale is not None
    hu = torch.tensor([-1100.0, -1000.0, -950.0, -900.0, 0.0])
    assert torch.allclose(torch.as_tensor(model.scale(hu)).float(), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


REG = bundle_dir("dl_ct_registration")


def test_registration_uses_its_items_and_agrees_with_the_legacy_form(tmp_path: Path, volume: Volume) -> None:
    """The registration bundle's items (window, isotropic spacing, grid, SimpleInferer) drive the model; the
    old all-``dicom_node`` form still works and gives the same transform."""
    from models.dl_ct_registration.model import DlCtRegistration

    inference = json.loads((REG / "configs" / "inference.json").read_text())
    assert {"preprocessing", "inferer"} <= inference.keys()
    assert inference["dicom_node"] == {"iterations": 3, "angle_scale_deg": 10.0, "shift_scale_mm": 30.0,
                                       "body_hu": -500.0}  # the rigid parameterisation only
    model = DlCtRegistration(device="cpu")
    assert model.pipeline.source == "bundle items" and type(model.pipeline.inferer).__name__ == "SimpleInferer"
    assert (model.spacing_mm, model.grid) == (4.5, (80, 80, 80))
    moved = volume.affine.copy()
    moved[:3, 3] += (12.0, -8.0, 10.0)
    prior = Volume(volume.voxels, moved, "CT", volume.sop_instance_uids, "1.2.3")
    reference = model.register(volume, prior)[0]
    root = tmp_path / "reg"
    shutil.copytree(REG, root)
    legacy = {k: inference[k] for k in ("device", "network_def", "network")}
    legacy["dicom_node"] = {"spacing_mm": 4.5, "grid": [80, 80, 80], "hu_window": [-1000.0, 1000.0],
                            **inference["dicom_node"]}
    old = DlCtRegistration(_write(root, legacy), device="cpu")
    assert old.pipeline.source == "dicom_node"
    np.testing.assert_allclose(old.register(volume, prior)[0], reference, atol=1e-4)
    scale = next(t for t in inference["preprocessing"]["transforms"] if t["_target_"] == "ScaleIntensityRanged")
    scale.update(a_min=2000.0, a_max=3000.0)  # every voxel below the window: the network sees zeros only
    model = DlCtRegistration(_write(root, inference), device="cpu")
    seen: list[float] = []
    model.network.register_forward_hook(lambda _m, args, _o: seen.append(float(args[0].abs().max())))
    model.register(volume, prior)
    assert seen == [0.0] * 3


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda t: t[3].update(pixdim=[4.5, 4.5, 5.0]), "must be isotropic"),
        (lambda t: t.pop(4), "a ResizeWithPadOrCropd transform"),
        (lambda t: t[1].update(axcodes="RAS"), "axcodes must be 'LPS'"),
    ],
)
def test_bad_registration_items_are_refused(tmp_path: Path, edit: Any, needle: str) -> None:
    from models.dl_ct_registration.model import DlCtRegistration

    root = tmp_path / "reg"
    shutil.copytree(REG, root)
    inference = json.loads((root / "configs" / "inference.json").read_text())
    edit(inference["preprocessing"]["transforms"])
    with pytest.raises(BundleError, match=needle):
        DlCtRegistration(_write(root, inference), device="cpu")
