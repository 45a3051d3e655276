"""models.registry and models.manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import registry
from models.base import Code
from models.manifest import ManifestError, load_manifest, load_manifest_file

GOOD = """\
name: test-model
version: 0.1.0
family: segmentation
description: a test model
modalities: [CT]
min_slices: 1
objects: [SEG]
outputs:
  - name: Lung
    category: {value: "123037004", scheme: SCT, meaning: Anatomical Structure}
    type: {value: "39607008", scheme: SCT, meaning: Lung}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "manifest.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_available_lists_the_hu_model() -> None:
    assert "ct-hu-segmentation" in registry.available()
    assert registry.available() == sorted(registry.available())


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(registry.UnknownModelError) as info:
        registry.validate_names(["ct-hu-segmentation", "no-such-model"])
    message = str(info.value)
    assert "no-such-model" in message and "ct-hu-segmentation" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert not message.startswith("'"), "message must not be repr-quoted like a plain KeyError"
    with pytest.raises(registry.UnknownModelError, match=r"known models: .*ct-hu-segmentation"):
        registry.load("no-such-model")
    with pytest.raises(KeyError):
        registry.manifest("no-such-model")
    registry.validate_names(["ct-hu-segmentation"])  # no error
    registry.validate_names([])


def test_hu_manifest_loads() -> None:
    m = registry.manifest("ct-hu-segmentation")
    assert (m.name, m.version, m.family) == ("ct-hu-segmentation", "1.0.0", "segmentation")
    assert m.modalities == ("CT",) and m.min_slices == 3 and m.objects == ("SEG", "SR")
    by_name = {o.name: o for o in m.outputs}
    assert list(by_name) == ["Body", "Right Lung", "Left Lung", "Bone"]
    anatomical = Code("123037004", "SCT", "Anatomical Structure")
    assert by_name["Body"].category == anatomical and by_name["Body"].type == Code("38266002", "SCT", "Entire body")
    assert by_name["Right Lung"].type == Code("3341006", "SCT", "Right lung")
    assert by_name["Left Lung"].type == Code("44029006", "SCT", "Left lung")
    assert by_name["Bone"].category == Code("85756007", "SCT", "Tissue")
    assert by_name["Bone"].type == Code("272673000", "SCT", "Bone")
    spec = load_manifest_file(registry.manifest_path("ct-hu-segmentation"))
    assert spec.laterality("Right Lung") == Code("24028007", "SCT", "Right")
    assert spec.laterality("Left Lung") == Code("7771000", "SCT", "Left")
    assert spec.laterality("Body") is None


def test_every_registered_model_loads_without_global_cache() -> None:
    for name in registry.available():
        a = registry.load(name)
        b = registry.load(name)
        assert a is not b
        assert a.manifest == registry.manifest(name)


def test_good_manifest(tmp_path: Path) -> None:
    m = load_manifest(_write(tmp_path, GOOD))
    assert m.name == "test-model" and m.outputs[0].type == Code("39607008", "SCT", "Lung")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (GOOD + "colour: blue\n", "colour"),  # unknown top-level key
        (GOOD.replace("meaning: Lung}", "meaning: Lung, extra: 1}"), "outputs.0.type.extra"),
        (GOOD.replace('value: "39607008"', "value: 39607008"), "outputs.0.type.value"),  # unquoted code
        (GOOD.replace("family: segmentation", "family: magic"), "family"),
        (GOOD.replace("objects: [SEG]", "objects: [PDF]"), "objects.0"),
        (GOOD.replace("min_slices: 1", "min_slices: 0"), "min_slices"),
        (GOOD.replace("version: 0.1.0", "version: 1.0"), "version"),
        (GOOD.replace("name: test-model\n", ""), "name"),
        (GOOD + GOOD[GOOD.index("  - name: Lung") :], "duplicate output names"),
        ("name: [unclosed\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
    ],
)
def test_bad_manifest_gives_clear_error(tmp_path: Path, text: str, needle: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert str(path) in message
    assert needle in message


def test_missing_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path / "nope.yaml")
