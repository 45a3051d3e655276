"""models.dl.bundle: loading MONAI-style bundles and TorchScript files, refusing what is not allowed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from models import registry  # noqa: E402
from models.dl.bundle import (  # noqa: E402
    NETWORKS,
    BundleError,
    load_network,
    parse_network_def,
    save_torchscript,
    write_bundle,
)
from models.dl.core import bundle_dir  # noqa: E402
from models.dl_ct_segmentation.model import DlCtSegmentation  # noqa: E402
from testkit.phantom import make_ct_phantom  # noqa: E402

PACKAGES = ("dl_ct_segmentation", "dl_lung_nodule_detection", "dl_emphysema_classification", "dl_ct_registration")
TINY_UNET: dict[str, Any] = {
    "_target_": "monai.networks.nets.UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 4,
    "channels": [4, 8],
    "strides": [2],
}


def _tiny_bundle(
    root: Path,
    network_def: Any = None,
    params: dict[str, Any] | None = None,
    build: dict[str, Any] = TINY_UNET,
) -> Path:
    """A bundle of a tiny network built from ``build``; ``network_def`` then replaces its config."""
    netdef = parse_network_def(build)
    write_bundle(root, netdef.build(), netdef, name="tiny", version="0.0.1", description="test", params=params or {})
    if network_def is not None:
        inference = json.loads((root / "configs" / "inference.json").read_text())
        inference["network_def"] = network_def
        (root / "configs" / "inference.json").write_text(json.dumps(inference))
    return root


@pytest.mark.parametrize("package", PACKAGES)
def test_shipped_bundles_load_as_state_dicts(package: str) -> None:
    root = bundle_dir(package)
    loaded = load_network(root, "cpu")
    assert loaded.kind == "state_dict" and loaded.version == "0.1.0-demo"
    assert loaded.name == package.replace("_", "-") and loaded.network_name in NETWORKS
    assert not loaded.network.training
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert "not a clinical model" in meta["description"]
    assert (root / "models" / "model.pt").stat().st_size < 4 * 2**20  # a few MB at most


def test_shipped_weights_are_small_in_total() -> None:
    total = sum((bundle_dir(p) / "models" / "model.pt").stat().st_size for p in PACKAGES)
    assert total < 10 * 2**20


def test_tiny_bundle_round_trip(tmp_path: Path) -> None:
    loaded = load_network(_tiny_bundle(tmp_path / "b", params={"overlap": 0.5}))
    assert (loaded.kind, loaded.name, loaded.version, loaded.network_name) == ("state_dict", "tiny", "0.0.1", "UNet")
    assert loaded.params == {"overlap": 0.5}
    with torch.no_grad():
        assert loaded.network(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 4, 16, 16, 16)


@pytest.mark.parametrize(
    ("network_def", "needle"),
    [
        ({**TINY_UNET, "_target_": "monai.networks.nets.EvilNet"}, "not allowed"),
        ({**TINY_UNET, "_target_": "torch.nn.Module"}, "not allowed"),
        ({**TINY_UNET, "_target_": "$__import__('os').system('true')"}, "not allowed"),
        ({**TINY_UNET, "act": "$torch.nn.ReLU"}, "'torch.nn.ReLU' is not allowed"),
        ({**TINY_UNET, "channels": "@network_channels"}, "'@network_channels' names no item"),
        ({**TINY_UNET, "norm": {"_target_": "torch.nn.BatchNorm3d"}}, "'torch.nn.BatchNorm3d' is not allowed"),
        ({**TINY_UNET, "no_such_argument": 1}, "unexpected keyword argument 'no_such_argument'"),
        ({k: v for k, v in TINY_UNET.items() if k != "_target_"}, "builds a dict, not a network"),
        ([1, 2, 3], "builds a list, not a network"),
    ],
)
def test_bad_network_def_is_refused(tmp_path: Path, network_def: Any, needle: str) -> None:
    root = _tiny_bundle(tmp_path / "b", network_def)
    with pytest.raises(BundleError, match=needle) as info:
        load_network(root)
    assert str(root) in str(info.value)


def test_networks_are_built_through_the_safe_resolver(tmp_path: Path) -> None:
    """Short names and expressions real bundles use are fine; a network outside the allow-list is not."""
    root = _tiny_bundle(tmp_path / "a", {**TINY_UNET, "_target_": "UNet", "channels": "$[@width, @width * 2]"})
    inference = json.loads((root / "configs" / "inference.json").read_text())
    (root / "configs" / "inference.json").write_text(json.dumps({**inference, "width": 4}))
    assert load_network(root).network_name == "UNet"
    root = _tiny_bundle(tmp_path / "b", {**TINY_UNET, "_target_": "DenseNet264"})
    with pytest.raises(BundleError, match="'DenseNet264' is not allowed"):
        load_network(root)


def test_bundle_problems_are_named(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such bundle"):
        load_network(tmp_path / "missing")
    root = _tiny_bundle(tmp_path / "no-version")
    (root / "configs" / "metadata.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(BundleError, match="'version'"):
        load_network(root)
    root = _tiny_bundle(tmp_path / "no-weights")
    (root / "models" / "model.pt").unlink()
    with pytest.raises(BundleError, match=r"model\.pt nor models/model\.ts"):
        load_network(root)
    root = _tiny_bundle(tmp_path / "wrong-shape", {**TINY_UNET, "channels": [4, 16]})
    with pytest.raises(BundleError, match="does not fit"):
        load_network(root)
    root = _tiny_bundle(tmp_path / "not-json")
    (root / "configs" / "inference.json").write_text("{")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_network(root)
    (tmp_path / "junk.ts").write_bytes(b"not a zip")
    with pytest.raises(BundleError, match="not a TorchScript file"):
        load_network(tmp_path / "junk.ts")


def test_pickled_objects_are_not_loaded(tmp_path: Path) -> None:
    """model.pt is read with weights_only=True: a pickled module (arbitrary code) is refused."""
    root = _tiny_bundle(tmp_path / "b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about saving a whole module
        torch.save(parse_network_def(TINY_UNET).build(), root / "models" / "model.pt")
    with pytest.raises(BundleError, match="cannot read a state dict"):
        load_network(root)


def test_model_refuses_bad_parameters_and_wrong_outputs(tmp_path: Path) -> None:
    root = _tiny_bundle(tmp_path / "b", params={"spacing_mm": [3, 3, 3], "colour": "blue"})
    with pytest.raises(BundleError, match="colour"):
        DlCtSegmentation(root, device="cpu")
    root = _tiny_bundle(tmp_path / "c", build={**TINY_UNET, "out_channels": 3})
    with pytest.raises(BundleError, match="does not have 4 channels"):
        DlCtSegmentation(root, device="cpu")


def test_torchscript_file_and_torchscript_bundle(tmp_path: Path) -> None:
    """The shipped segmentation network as TorchScript (extra file with its parameters) gives the
    same label map as the state-dict bundle, both as a bare .ts file and inside a bundle."""
    ref = DlCtSegmentation(device="cpu")
    ts = tmp_path / "seg.ts"
    save_torchscript(ts, ref.network, name="site-seg", version="2.0.0", params=ref.loaded.params)
    from_file = DlCtSegmentation(ts, device="cpu")
    assert (from_file.loaded.kind, from_file.loaded.name, from_file.loaded.version) == (
        "torchscript",
        "site-seg",
        "2.0.0",
    )
    assert from_file.params == ref.params
    root = tmp_path / "bundle"
    shutil.copytree(bundle_dir("dl_ct_segmentation") / "configs", root / "configs")
    (root / "models").mkdir()
    shutil.copy(ts, root / "models" / "model.ts")
    from_bundle = DlCtSegmentation(root, device="cpu")
    assert from_bundle.loaded.kind == "torchscript" and from_bundle.loaded.version == "0.1.0-demo"
    volume = make_ct_phantom(16, 64, 64, pixel_mm=4.8, slice_mm=10.0, seed=5, nodules=0).to_volume()
    expected = ref.label_map(volume)
    for model in (from_file, from_bundle):
        assert np.mean(model.label_map(volume) == expected) > 0.999
        assert any("torchscript" in note for note in model.run(volume).notes)


def test_node_side_imports_do_not_import_torch() -> None:
    """The registry (used by the node process) and testkit.dl_evaluate import torch only when a
    DL model is built."""
    code = (
        "import sys; import models.registry as r; import testkit.dl_evaluate; "
        "r.manifest('dl-ct-segmentation'); r.validate_names(['dl-ct-registration']); "
        "assert 'torch' not in sys.modules and 'monai' not in sys.modules, 'torch imported'"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)


def test_registry_builds_the_dl_models() -> None:
    for name in ("dl-ct-segmentation", "dl-lung-nodule-detection", "dl-emphysema-classification", "dl-ct-registration"):
        assert name in registry.available()
        assert registry.manifest(name).version == "0.1.0-demo"
        assert "not a clinical model" in registry.manifest(name).description
