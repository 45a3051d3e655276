"""models.bundle: hostile or broken bundle configs are refused with the file and key named, nothing runs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from models.bundle import BundleConfig, BundleConfigError


def _bundle(tmp_path: Path, config: dict[str, Any], name: str = "inference.json") -> Path:
    (tmp_path / "configs").mkdir(parents=True, exist_ok=True)
    (tmp_path / "configs" / name).write_text(json.dumps(config))
    return tmp_path


PWNED = "/tmp/dicom-node-bundle-pwned"

# (config, item to build, expected message); every case is refused by the static check too.
HOSTILE: dict[str, tuple[dict[str, Any], str, str]] = {
    "os.system target": (
        {"x": {"_target_": "os.system", "command": f"touch {PWNED}"}}, "x", "x: _target_ 'os.system' is not allowed"),
    "__import__": ({"x": f"$__import__('os').system('touch {PWNED}')"}, "x", "x: name '__import__' is not allowed"),
    "open": ({"x": "$open('/etc/passwd').read()"}, "x", "x: name 'open' is not allowed"),
    "eval": ({"x": "$eval('1')"}, "x", "x: name 'eval' is not allowed"),
    "getattr": ({"a": 1, "x": "$getattr(@a, 'real')"}, "x", "x: name 'getattr' is not allowed"),
    "__class__ attribute": (
        {"a": [1], "x": "$@a.__class__.__bases__[0].__subclasses__()"}, "x", "x: attribute '__class__' is not allowed"),
    "dunder on a literal": ({"x": "$().__class__"}, "x", "x: attribute '__class__' is not allowed"),
    "str.format escape": ({"a": 1, "x": "$'{0.__class__}'.format(@a)"}, "x", "x: attribute 'format' is not allowed"),
    "lambda": ({"x": "$lambda: 0"}, "x", "x: Lambda is not allowed"),
    "walrus": ({"x": "$(y := 1)"}, "x", "x: NamedExpr is not allowed"),
    "f-string": ({"a": 1, "x": "$f'{@a}'"}, "x", "x: JoinedStr is not allowed"),
    "module as a value": ({"x": "$torch"}, "x", "x: module 'torch' cannot be used as a value"),
    "os through an expression": ({"x": f"$os.system('touch {PWNED}')"}, "x", "x: name 'os' is not allowed"),
    "monai callable not allowed (expression)": (
        {"x": "$monai.utils.set_determinism(seed=1)"}, "x", "x: 'monai.utils.set_determinism' is not allowed"),
    "monai callable not allowed (target)": (
        {"x": {"_target_": "monai.bundle.ConfigParser"}}, "x", "x: _target_ 'monai.bundle.ConfigParser' is not"),
    "Lambdad (runs a function)": (
        {"x": {"_target_": "Lambdad", "keys": "image", "func": "$print"}}, "x", "x: _target_ 'Lambdad' is not"),
    "bundle scripts": (
        {"inferer": {"_target_": "scripts.detection_inferer.RetinaNetInferer"}}, "inferer",
        "inferer: _target_ 'scripts.detection_inferer.RetinaNetInferer' is not allowed"),
    "allowed name in a foreign module": (
        {"x": {"_target_": "os.UNet"}}, "x", "x: _target_ 'os.UNet' is not allowed"),
    "reference cycle": (
        {"a": "$@b + 1", "b": "$@c + 1", "c": "$@a + 1"}, "a", "c: reference cycle: a -> b -> c -> a"),
    "self reference": (
        {"a": {"_target_": "Compose", "transforms": ["@a"]}}, "a", "a::transforms::0: reference cycle: a"),
    "missing reference": ({"a": {"_target_": "UNet", "spatial_dims": "@dims"}}, "a",
                          "a::spatial_dims: reference '@dims' names no item"),
    "missing reference in an expression": ({"x": "$@nope + 1"}, "x", "x: reference '@nope' names no item"),
    "_mode_ callable": ({"x": {"_target_": "Compose", "_mode_": "callable"}}, "x",
                        "x: _mode_ 'callable' is not supported"),
    "_mode_ debug": ({"x": {"_target_": "Compose", "_mode_": "debug"}}, "x", "x: _mode_ 'debug' is not supported"),
    "** unpacking": ({"x": "$torch.device(**{'type': 'cpu'})"}, "x", "x: '**' unpacking is not allowed"),
    "data input outside a list": (
        {"x": {"_target_": "LoadImaged", "keys": "image"}}, "x", "x: _target_ 'LoadImaged' is not built: data input"),
    "requires runs a forbidden item": (
        {"x": {"_target_": "Compose", "_requires_": f"$os.system('touch {PWNED}')"}}, "x",
        "x::_requires_: name 'os' is not allowed"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_config_is_refused_with_the_key_named(tmp_path: Path, case: str) -> None:
    config, item, message = HOSTILE[case]
    cfg = BundleConfig.read(_bundle(tmp_path, config))
    with pytest.raises(BundleConfigError) as checked:
        cfg.check(item)
    assert f"inference.json: {message}" in str(checked.value)
    if "torch" in message or "UNet" in json.dumps(config) or "Compose" in json.dumps(config):
        pytest.importorskip("monai")
    with pytest.raises(BundleConfigError) as built:
        cfg.get(item)
    assert f"inference.json: {message}" in str(built.value)
    assert not Path(PWNED).exists()


def test_runaway_arithmetic_is_refused(tmp_path: Path) -> None:
    cfg = BundleConfig.read(_bundle(tmp_path, {"p": "$9 ** 9 ** 9", "m": "$'a' * 10 ** 9",
                                               "r": "$list(range(10 ** 9))", "ok": "$2 ** 10"}))
    with pytest.raises(BundleConfigError, match="p: exponent too large"):
        cfg.get("p")
    with pytest.raises(BundleConfigError, match="m: sequence too long"):
        cfg.get("m")
    with pytest.raises(BundleConfigError, match=r"r: evaluating .* failed: ValueError: range of"):
        cfg.get("r")
    assert cfg.get("ok") == 1024


def test_macro_may_not_read_outside_the_bundle(tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"secret": 42}))
    bundle = tmp_path / "bundle"
    for spec in (f"%{outside}::secret", "%../outside.json::secret", "%../../outside.json::secret"):
        _bundle(bundle, {"x": spec})
        with pytest.raises(BundleConfigError, match=r"inference.json: x: macro file .* is outside the bundle"):
            BundleConfig.read(bundle)


def test_macro_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(BundleConfigError, match=r"inference.json: x: macro '%nope' names no item"):
        BundleConfig.read(_bundle(tmp_path, {"x": "%nope"}))
    with pytest.raises(BundleConfigError, match=r"inference.json: x: macro file 'other.json' not found"):
        BundleConfig.read(_bundle(tmp_path, {"x": "%other.json::a"}))
    with pytest.raises(BundleConfigError, match=r"x::y: relative id in '@::::::a' goes above the config root"):
        BundleConfig.read(_bundle(tmp_path, {"x": {"y": "@::::::a"}}))


def test_yaml_tags_are_not_constructed(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "inference.yaml").write_text(f"x: !!python/object/apply:os.system ['touch {PWNED}']\n")
    with pytest.raises(BundleConfigError, match=r"inference.yaml: not valid YAML"):
        BundleConfig.read(tmp_path)
    assert not Path(PWNED).exists()


def test_broken_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "inference.json").write_text('{"a": 1, "a": 2}')
    with pytest.raises(BundleConfigError, match=r"inference.json: not valid JSON: duplicate key 'a'"):
        BundleConfig.read(tmp_path)
    (tmp_path / "configs" / "inference.json").write_text("[1]")
    with pytest.raises(BundleConfigError, match=r"inference.json: must be a JSON/YAML object"):
        BundleConfig.read(tmp_path)
    with pytest.raises(BundleConfigError, match=r"no such bundle directory"):
        BundleConfig.read(tmp_path / "nope")
    with pytest.raises(BundleConfigError, match=r"inference.json: nope: no such item"):
        BundleConfig.read(_bundle(tmp_path, {"a": 1})).get("nope")


def test_disabled_items_are_not_built_even_when_hostile(tmp_path: Path) -> None:
    """``_disabled_`` items are left out (as MONAI does) without their target being looked at."""
    cfg = BundleConfig.read(_bundle(tmp_path, {
        "flag": True,
        "x": [{"_target_": "os.system", "_disabled_": True}, {"_target_": "os.system", "_disabled_": "true"}, 1],
        "y": {"a": {"_target_": "os.system", "_disabled_": "@flag"}, "b": 2},
    }))
    cfg.check("x")
    assert cfg.get("x") == [1]
    assert cfg.get("y") == {"b": 2}


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, (f"touch {PWNED}",))


def test_weights_never_unpickle_code(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from models.bundle import load_weights
    from models.errors import BundleError

    net = torch.nn.Linear(2, 2)
    good = tmp_path / "model.pt"
    torch.save({"model": net.state_dict()}, good)  # a CheckpointSaver-style dict
    other = torch.nn.Linear(2, 2)
    load_weights(other, good)
    assert torch.equal(other.weight, net.weight)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(BundleError, match=r"evil.pt: cannot read a state dict"):
        load_weights(other, evil)
    assert not Path(PWNED).exists()
    with pytest.raises(BundleError, match=r"model.pt: does not fit the bundle's network_def"):
        load_weights(torch.nn.Linear(3, 2), good)
    with pytest.raises(BundleError, match=r"nope.pt: no such weights file"):
        load_weights(other, tmp_path / "nope.pt")


def test_deep_nesting_is_refused_cleanly(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "inference.json").write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(BundleConfigError, match=r"inference.json: (not valid JSON|nested too deeply)"):
        BundleConfig.read(tmp_path)
    for depth in (900, 990):  # parses, or not; either way the error is ours
        (tmp_path / "configs" / "inference.json").write_text('{"x": ' + "[" * depth + "]" * depth + "}")
        try:
            BundleConfig.read(tmp_path).check("x")
        except BundleConfigError as exc:
            assert "nested too deeply" in str(exc) or "not valid JSON" in str(exc)
    cfg = BundleConfig.read(_bundle(tmp_path, {"x": "$" + "(" * 5_000 + "1" + ")" * 5_000}))
    with pytest.raises(BundleConfigError, match=r"inference.json: x: "):
        cfg.get("x")
