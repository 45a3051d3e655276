"""Site models from configuration: settings shapes, the code table, label resolution, the registry and
``check-config`` / ``dicom-node models`` (no torch: what the node process does)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from models import codes, registry
from models.base import Code
from models.errors import ModelOptionsError
from models.site import LabelDef, define
from node.checks import check_models
from node.cli import main
from node.config import parse_settings

ROOT = Path(__file__).resolve().parents[2]
SPLEEN = ROOT / "tests" / "data" / "bundles" / "spleen_ct_segmentation"
SPLEEN_CODE = Code("78961009", "SCT", "Spleen")
LESION = {"category": {"value": "49755003", "scheme": "SCT", "meaning": "Morphologically Altered Structure"},
          "type": {"value": "52988006", "scheme": "SCT", "meaning": "Lesion"}}


@pytest.fixture(autouse=True)
def _no_site_models() -> Iterator[None]:
    yield
    registry.set_site_models([])


def _settings(tmp_path: Path, models: dict[str, Any], rules: list[dict[str, Any]] | None = None) -> Any:
    return parse_settings({"node": {"storage_dir": str(tmp_path / "s")}, "models": models, "rules": rules or []})


def _spleen(**extra: Any) -> dict[str, Any]:
    return {"family": "segmentation", "bundle": str(SPLEEN), "modality": "CT", **extra}


def _config_file(tmp_path: Path, models: dict[str, Any]) -> Path:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"node": {"storage_dir": str(tmp_path / "s")}, "models": models,
                                   "rules": [{"name": "ct", "match": {"Modality": "CT"}, "models": list(models)}]}))
    return cfg


def test_code_table_is_the_cited_totalsegmentator_table() -> None:
    table = codes.table()
    assert len(table) == 170
    assert codes.lookup("spleen") == codes.lookup("Spleen") == codes.CodedStructure(
        "spleen", Code("123037004", "SCT", "Anatomical Structure"), SPLEEN_CODE)
    left = codes.lookup("Kidney Left")
    assert left is not None and left.type.meaning == "Kidney" and left.laterality == Code("7771000", "SCT", "Left")
    assert codes.lookup("unicorn horn") is None
    assert "Apache License 2.0" in (codes.TABLE.parent / "README.md").read_text()
    assert "Apache License" in (codes.TABLE.parent / "LICENSE-totalsegmentator").read_text()


@pytest.mark.parametrize(("entry", "message"), [
    ({"family": "segmentation", "modality": "CT"}, "only a site model"),
    ({"bundle": "/b", "torchscript": "/t.ts", "family": "segmentation", "modality": "CT"}, "not both"),
    ({"bundle": "/b", "modality": "CT"}, "family is required"),
    ({"bundle": "/b", "family": "segmentation"}, "modality (or modalities) is required"),
    ({"torchscript": "/t.ts", "family": "segmentation", "modality": "CT"}, "labels are required"),
    ({"bundle": "/b", "path": "/p", "family": "segmentation", "modality": "CT"}, "path: a site model"),
])
def test_settings_refuse_incomplete_definitions(tmp_path: Path, entry: dict[str, Any], message: str) -> None:
    from models.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _settings(tmp_path, {"site-x": entry})


def test_spleen_bundle_defines_a_model_with_labels_from_its_channel_def(tmp_path: Path) -> None:
    settings = _settings(tmp_path, {"spleen-ct": _spleen(queue="gpu")},
                         [{"name": "ct", "match": {"Modality": "CT"}, "models": ["spleen-ct"]}])
    check_models(settings)
    assert "spleen-ct" in registry.available() and registry.site_models() == ["spleen-ct"]
    assert "ct-hu-segmentation" in registry.available()  # beside the built-in ones
    spec = registry.spec("spleen-ct")
    assert spec.site is not None and spec.site.kind == "bundle" and spec.path == SPLEEN
    assert registry.is_deep_learning("spleen-ct") and spec.extra == "ml"
    m = registry.manifest("spleen-ct")
    metadata = json.loads((SPLEEN / "configs" / "metadata.json").read_text())
    assert (m.family, m.modalities, m.version, m.objects) == ("segmentation", ("CT",), metadata["version"],
                                                              ("SEG", "SR"))
    assert [(o.name, o.type) for o in m.outputs] == [("Spleen", SPLEEN_CODE)]
    assert spec.site.labels[0].index == 1
    check_models(_settings(tmp_path, {}))  # the next configuration replaces the site models
    assert "spleen-ct" not in registry.available()


def test_labels_override_names_and_codes(tmp_path: Path) -> None:
    model = define("spleen-x", family="segmentation", bundle=SPLEEN, modalities=["CT"], version="2.0.0",
                   labels={1: LabelDef("Spleen (site)", Code("123037004", "SCT", "Anatomical Structure"),
                                       SPLEEN_CODE)}, objects=["SEG", "SR", "PDF"])
    assert [(lb.index, lb.name) for lb in model.labels] == [(1, "Spleen (site)")]
    assert model.version == "2.0.0" and model.objects == ("SEG", "SR", "PDF")


def test_unknown_label_without_codes_fails_check_config_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config_file(tmp_path, {"spleen-ct": _spleen(labels={1: {"name": "splenule"}})})
    assert main(["check-config", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "models.spleen-ct.labels.1" in err and "'splenule' is not in the code table" in err
    cfg = _config_file(tmp_path, {"spleen-ct": _spleen(labels={1: {"name": "splenule", **LESION}})})
    assert main(["check-config", "-c", str(cfg)]) == 0
    cfg = _config_file(tmp_path, {"spleen-ct": _spleen(labels={2: {"name": "spleen"}})})
    assert main(["check-config", "-c", str(cfg)]) == 2
    assert "has no channel 2" in capsys.readouterr().err


def test_check_config_refuses_missing_or_unsafe_bundles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config_file(tmp_path, {"spleen-ct": _spleen(bundle=str(tmp_path / "nowhere"))})
    assert main(["check-config", "-c", str(cfg)]) == 2
    assert "models.spleen-ct.bundle" in capsys.readouterr().err
    evil = tmp_path / "evil"
    shutil.copytree(SPLEEN / "configs", evil / "configs")
    inference = json.loads((evil / "configs" / "inference.json").read_text())
    inference["inferer"]["roi_size"] = "$__import__('os').system('touch pwned')"
    (evil / "configs" / "inference.json").write_text(json.dumps(inference))
    cfg = _config_file(tmp_path, {"spleen-ct": _spleen(bundle=str(evil))})
    assert main(["check-config", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "models.spleen-ct.bundle" in err and "inferer" in err
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_site_model_cannot_take_a_builtin_name(tmp_path: Path) -> None:
    with pytest.raises(ModelOptionsError, match="built-in model 'ct-hu-segmentation'"):
        check_models(_settings(tmp_path, {"ct-hu-segmentation": _spleen()}))


def test_torchscript_site_model_needs_its_file_and_coded_labels(tmp_path: Path) -> None:
    with pytest.raises(ModelOptionsError, match=r"models\.seg-ts\.torchscript: .* is not a file"):
        define("seg-ts", family="segmentation", torchscript=tmp_path / "m.ts", modalities=["MR"],
               labels={1: LabelDef("brain")})
    (tmp_path / "m.ts").write_bytes(b"not checked here")
    model = define("seg-ts", family="segmentation", torchscript=tmp_path / "m.ts", modalities=["MR"],
                   labels={1: LabelDef("brain")})
    assert model.kind == "torchscript" and model.labels[0].type == Code("12738006", "SCT", "Brain")


def test_detection_bundle_defines_a_detection_model(tmp_path: Path) -> None:
    """family: detection with the model-zoo-form RetinaNet bundle: labels are class indices from 0, the detector
    and its ops are checked (its script inferer is not used), default objects SR, SC and PDF."""
    bundle = ROOT / "tests" / "data" / "bundles" / "retinanet_detection"
    entry = {"family": "detection", "bundle": str(bundle), "modality": "CT", "labels": {0: {"name": "nodule"}}}
    check_models(_settings(tmp_path, {"nodules-zoo": entry}))
    spec = registry.specs()["nodules-zoo"]
    assert spec.site is not None and spec.file.family == "detection" and spec.file.entry == "BundleDetection"
    assert [(lb.index, lb.type) for lb in spec.site.labels] == [(0, Code("27925004", "SCT", "Nodule"))]
    assert spec.site.objects == ("SR", "SC", "PDF")
    with pytest.raises(ModelOptionsError, match=r"models\.nodules-zoo\.torchscript: a detection site model needs"):
        check_models(_settings(tmp_path, {"nodules-zoo": {**entry, "bundle": None, "torchscript": str(bundle)}}))


def test_models_command_lists_site_models_without_torch(tmp_path: Path) -> None:
    """The node process resolves a site model from its bundle's JSON only: torch and MONAI stay unimported."""
    cfg = _config_file(tmp_path, {"spleen-ct": _spleen()})
    code = (
        "import sys\n"
        "from node.cli import main\n"
        f"rc = main(['models', '-c', {str(cfg)!r}])\n"
        "print('RC', rc)\n"
        "assert not any(m in sys.modules for m in ('torch', 'monai')), 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line[:1].isalpha() and " " in line}
    assert "RC 0" in done.stdout
    assert f"site (bundle {SPLEEN})" in lines["spleen-ct"] and "segmentation" in lines["spleen-ct"]
    assert "built-in" in lines["ct-hu-segmentation"]


def test_api_lists_site_models_beside_builtin_ones(tmp_path: Path) -> None:
    from tests.unit.api_helpers import api_node

    with api_node(tmp_path) as node:
        check_models(_settings(tmp_path, {"spleen-ct": _spleen()}))  # what `dicom-node run` does at start-up
        models = {m["name"]: m for m in node.get("/api/v1/models").json()}
    assert models["spleen-ct"]["family"] == "segmentation" and models["spleen-ct"]["runtime"] == "torch"
    assert models["spleen-ct"]["modalities"] == ["CT"] and "ct-hu-segmentation" in models
