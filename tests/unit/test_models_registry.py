"""models.registry and models.manifest."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from models import registry
from models.base import Code
from models.errors import PermanentModelError
from models.manifest import ManifestError, load_manifest, load_manifest_file

GOOD = """\
name: test-model
version: 0.1.0
entry: TestModel
runtime: classical
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
    assert (m.name, m.version, m.family) == ("ct-hu-segmentation", "1.2.0", "segmentation")
    assert m.modalities == ("CT",) and m.min_slices == 3 and m.objects == ("SEG", "SR", "SC", "PDF")
    by_name = {o.name: o for o in m.outputs}
    assert list(by_name) == ["Body", "Right Lung", "Left Lung", "Bone", "Airway"]
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
        (GOOD.replace("objects: [SEG]", "objects: [MPEG]"), "objects.0"),
        (GOOD.replace("min_slices: 1", "min_slices: 0"), "min_slices"),
        (GOOD.replace("version: 0.1.0", "version: 1.0"), "version"),
        (GOOD.replace("name: test-model\n", ""), "name"),
        (GOOD + GOOD[GOOD.index("  - name: Lung") :], "duplicate output names"),
        ("name: [unclosed\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        (GOOD.replace("entry: TestModel", "entry: os.system"), "entry"),  # an identifier only
        (GOOD.replace("entry: TestModel", "entry: \"__import__('os')\""), "entry"),
        (GOOD.replace("entry: TestModel", "entry: class"), "keyword"),
        (GOOD.replace("entry: TestModel\n", ""), "entry"),
        (GOOD.replace("runtime: classical", "runtime: jax"), "runtime"),
        (GOOD.replace("runtime: classical", "runtime: torch"), "requires.modules to list torch"),
        (GOOD + "requires: {extra: ml, modules: [SimpleITK], pip: x}\n", "requires.pip"),
        (GOOD + "requires: {extra: ml, modules: [torch.nn]}\n", "requires.modules.0"),  # top-level names
        (GOOD + "requires: {extra: ml, modules: []}\n", "requires.modules"),
        (GOOD + "requires: {modules: [SimpleITK]}\n", "requires.extra"),
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


# --- per-model options (ModelOptions) ---------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def test_model_options_are_validated() -> None:
    assert registry.ModelOptions() == registry.DEFAULT_OPTIONS
    assert registry.ModelOptions(path="/x/y").path == Path("/x/y")  # type: ignore[arg-type]
    for bad in ({"device": "tpu"}, {"precision": "fp16"}, {"batch_size": 0}, {"batch_size": True}):
        with pytest.raises(registry.ModelOptionsError):
            registry.ModelOptions(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["ct-hu-segmentation", "ct-lung-nodules", "ct-emphysema", "ct-registration"])
def test_classical_models_refuse_what_they_cannot_honour(name: str, tmp_path: Path) -> None:
    assert not registry.is_deep_learning(name)
    for options, needle in (
        (registry.ModelOptions(path=tmp_path), f"path ({tmp_path})"),
        (registry.ModelOptions(device="cuda"), "device: cuda"),
        (registry.ModelOptions(precision="amp"), "precision: amp"),
    ):
        with pytest.raises(registry.ModelOptionsError) as info:
            registry.load(name, options)
        assert f"models.{name}" in str(info.value) and needle in str(info.value)
    # device auto/cpu and a batch size (the configuration's default is 4) are accepted and ignored
    registry.check_options(name, registry.ModelOptions(device="cpu", batch_size=16))
    assert registry.load(name, registry.ModelOptions(device="auto", batch_size=4)).manifest.name == name


def test_dl_model_options_are_checked_without_torch(tmp_path: Path) -> None:
    """check_options (for start-up) does not look at files; load refuses a missing path before importing
    torch, naming the path."""
    missing = tmp_path / "no-such-bundle"
    code = (
        "import sys, pathlib; from models import registry as r; "
        f"o = r.ModelOptions(path=pathlib.Path({str(missing)!r}), device='cuda', precision='amp'); "
        "[r.check_options(n, o) for n in r.available() if r.is_deep_learning(n)]\n"
        "try:\n    r.load('dl-ct-segmentation', o)\nexcept r.ModelOptionsError as e:\n    print(e)\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60, capture_output=True,
                         text=True).stdout
    assert f"models.dl-ct-segmentation.path: {missing} does not exist" in out


def _site_copy(dest: Path) -> Path:
    from models.dl.core import bundle_dir

    for part in ("configs", "models"):
        shutil.copytree(bundle_dir("dl_ct_segmentation") / part, dest / part)
    return dest


def test_dl_model_is_built_from_the_configured_path_with_the_options(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("monai")
    site = _site_copy(tmp_path / "site-seg")
    options = registry.ModelOptions(path=site, device="cpu", batch_size=2, precision="amp")
    with caplog.at_level(logging.INFO, logger="models.registry"):
        model = registry.load("dl-ct-segmentation", options)
    assert model.loaded.source == site / "models" / "model.pt"  # type: ignore[attr-defined]
    assert (model.device.type, model.batch_size, model.precision) == ("cpu", 2, "amp")  # type: ignore[attr-defined]
    [record] = [r for r in caplog.records if r.name == "models.registry"]
    assert str(site) in record.getMessage() and "batch size 2" in record.getMessage()
    # the classifier takes the options too (and gives them to its lung segmenter)
    cls = registry.load("dl-emphysema-classification", registry.ModelOptions(device="cpu", batch_size=3))
    assert cls.batch_size == 3 and cls.segmenter.batch_size == 3  # type: ignore[attr-defined]
    # a broken copy: the error names the file
    (site / "models" / "model.pt").write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match=re.escape(str(site / "models" / "model.pt"))):
        registry.load("dl-ct-segmentation", options)


def test_dl_model_refuses_cuda_without_a_gpu() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("monai")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    with pytest.raises(ValueError, match="no CUDA device"):
        registry.load("dl-ct-registration", registry.ModelOptions(device="cuda"))


def test_worker_builds_models_with_the_site_settings(tmp_path: Path) -> None:
    """workers.pipeline.WorkerContext.model turns ``models.<name>`` settings into ModelOptions."""
    pytest.importorskip("torch")
    pytest.importorskip("monai")
    from node.config import parse_settings
    from workers.pipeline import WorkerContext

    site = _site_copy(tmp_path / "site-seg")
    settings = parse_settings({
        "node": {"storage_dir": str(tmp_path / "storage")},
        "models": {
            "dl-ct-segmentation": {"path": str(site), "device": "cpu", "batch_size": 2, "precision": "fp32"},
            "ct-hu-segmentation": {"batch_size": 8},
            "ct-emphysema": {"path": str(site)},
        },
    })
    ctx = WorkerContext.from_settings(settings)
    model = ctx.model("dl-ct-segmentation")
    assert ctx.model("dl-ct-segmentation") is model  # kept warm
    assert model.loaded.source.parent.parent == site and model.batch_size == 2  # type: ignore[attr-defined]
    assert ctx.model("ct-hu-segmentation").manifest.name == "ct-hu-segmentation"
    with pytest.raises(registry.ModelOptionsError, match="classical model"):
        ctx.model("ct-emphysema")


# --- the registry is built from the manifests (models/<package>/manifest.yaml) ----------------------

MODEL_FOLDERS = {
    "ct_hu_segmentation", "ct_lung_nodules", "ct_emphysema", "ct_registration",
    "dl_ct_segmentation", "dl_lung_nodule_detection", "dl_emphysema_classification", "dl_ct_registration",
    "mr_brain_segmentation", "cxr_lung_fields",
}


def test_registry_is_built_from_the_model_folders() -> None:
    folders = {p.parent.name for p in registry.MODELS_DIR.glob("*/manifest.yaml")}
    assert folders == MODEL_FOLDERS
    assert registry.available() == sorted(f.replace("_", "-") for f in MODEL_FOLDERS)
    assert registry.specs() is registry.specs()  # scanned once
    for name in registry.available():
        spec = registry.spec(name)
        assert spec.package == f"models.{name.replace('-', '_')}"
        assert registry.manifest_path(name) == registry.MODELS_DIR / name.replace("-", "_") / "manifest.yaml"
        assert registry.is_deep_learning(name) == name.startswith("dl-") == (spec.runtime == "torch")
        if name.startswith("dl-"):
            assert (spec.extra, spec.modules) == ("ml", ("torch", "monai"))
        elif name == "ct-registration":
            assert (spec.extra, spec.modules) == ("ml", ("SimpleITK",))
        else:
            assert (spec.extra, spec.modules) == (None, ())  # numpy/SciPy: the base install
    assert registry.spec("dl-emphysema-classification").entry == "DlEmphysemaClassification"


FAKE_CODE = '''\
from pathlib import Path

from models.manifest import load_manifest

MANIFEST = load_manifest(Path(__file__).with_name("manifest.yaml"))


class FakeModel:
    def __init__(self, *args, **kwargs):
        self.manifest = MANIFEST
        self.args, self.kwargs = args, kwargs


def helper():
    return None


__all__ = ["FakeModel", "helper"]
'''


def _fake_models(root: Path, monkeypatch: pytest.MonkeyPatch, manifest: str = GOOD, code: str = FAKE_CODE) -> Path:
    """A models directory ``<root>/fakemodels`` (importable) with one model folder ``test_model``."""
    base = root / "fakemodels"
    (base / "test_model").mkdir(parents=True)
    (base / "__init__.py").write_text("")
    (base / "test_model" / "__init__.py").write_text(code)
    (base / "test_model" / "manifest.yaml").write_text(manifest.replace("entry: TestModel", "entry: FakeModel"))
    monkeypatch.syspath_prepend(str(root))
    for mod in [m for m in sys.modules if m.split(".")[0] == "fakemodels"]:
        monkeypatch.delitem(sys.modules, mod)
    return base


def _use_registry(monkeypatch: pytest.MonkeyPatch, specs: dict[str, registry.ModelSpec]) -> None:
    monkeypatch.setattr(registry, "specs", lambda: specs)


def test_scan_builds_a_model_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _fake_models(tmp_path, monkeypatch)
    found = registry.scan(base, "fakemodels")
    assert list(found) == ["test-model"] and found["test-model"].package == "fakemodels.test_model"
    assert "fakemodels.test_model" not in sys.modules  # scanning imports nothing
    model = registry.build(found["test-model"], registry.ModelOptions(device="cpu", batch_size=2))
    assert model.manifest.name == "test-model" and model.args == () and model.kwargs == {}  # type: ignore[attr-defined]
    _use_registry(monkeypatch, found)
    assert registry.available() == ["test-model"] and not registry.is_deep_learning("test-model")
    with pytest.raises(registry.ModelOptionsError, match="classical model"):
        registry.load("test-model", registry.ModelOptions(device="cuda"))
    assert registry.load("test-model").manifest.name == "test-model"


def test_torch_runtime_models_get_the_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch_manifest = GOOD.replace("runtime: classical", "runtime: torch") + "requires: {extra: ml, modules: [numpy]}\n"
    with pytest.raises(ManifestError, match=r"requires\.modules to list torch"):
        registry.scan(_fake_models(tmp_path / "a", monkeypatch, torch_manifest), "fakemodels")
    torch_manifest = torch_manifest.replace("[numpy]", "[torch]")
    spec = registry.scan(_fake_models(tmp_path / "b", monkeypatch, torch_manifest), "fakemodels")["test-model"]
    model = registry.build(spec, registry.ModelOptions(device="cpu", batch_size=2, precision="amp"))
    assert model.args == (None,)  # type: ignore[attr-defined]
    assert model.kwargs == {"device": "cpu", "batch_size": 2, "precision": "amp"}  # type: ignore[attr-defined]
    model = registry.build(spec, registry.ModelOptions(path=tmp_path))
    assert model.args == (tmp_path,)  # type: ignore[attr-defined]
    assert model.kwargs == {"device": None, "batch_size": None, "precision": "fp32"}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("entry", "code", "needle"),
    [
        ("NotExported", FAKE_CODE, "entry 'NotExported' is not exported by fakemodels.test_model"),
        ("FakeModel", FAKE_CODE.replace('__all__ = ["FakeModel", "helper"]', ""), "is not exported"),
        ("FakeModel", FAKE_CODE.replace('__all__ = ["FakeModel", "helper"]', "__all__ = names()"), "literal list"),
        ("os.system", FAKE_CODE, "entry"),
    ],
)
def test_scan_refuses_an_entry_the_package_does_not_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str, code: str, needle: str
) -> None:
    base = _fake_models(tmp_path, monkeypatch, GOOD.replace("entry: TestModel", f"entry: {entry}"), code)
    with pytest.raises(ManifestError) as info:
        registry.scan(base, "fakemodels")
    assert needle in str(info.value) and str(base / "test_model") in str(info.value)


def test_entry_must_be_a_class_and_the_folder_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _fake_models(tmp_path, monkeypatch, GOOD.replace("entry: TestModel", "entry: helper"))
    spec = registry.scan(base, "fakemodels")["test-model"]
    with pytest.raises(ManifestError, match=r"'helper' is not a class exported by fakemodels\.test_model"):
        registry.build(spec)
    (base / "test_model").rename(base / "other_name")
    with pytest.raises(ManifestError, match="must live in a folder named 'test_model'"):
        registry.scan(base, "fakemodels")


def test_missing_modules_name_the_extra_and_load_stops_before_importing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = GOOD + "requires: {extra: ml, modules: [numpy, no_such_module_for_dicom_node]}\n"
    _use_registry(monkeypatch, registry.scan(_fake_models(tmp_path, monkeypatch, manifest), "fakemodels"))
    assert registry.missing_modules("test-model") == ["no_such_module_for_dicom_node"]
    with pytest.raises(registry.MissingExtraError) as info:
        registry.load("test-model")
    assert str(info.value) == (
        "models.test-model: needs the optional extra 'ml' (pip install 'dicom-ai-node[ml]'); "
        "missing: no_such_module_for_dicom_node"
    )
    assert isinstance(info.value, registry.ModelOptionsError)
    assert isinstance(info.value, PermanentModelError)  # a worker fails the job at once
    assert "fakemodels.test_model" not in sys.modules


def test_a_blocked_module_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert registry.missing_modules("ct-registration") == []
    registry.check_installed("ct-hu-segmentation")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # what an install without the extra looks like
    assert registry.missing_modules("ct-registration") == ["SimpleITK"]
    assert registry.missing_modules("ct-hu-segmentation") == []
    with pytest.raises(registry.MissingExtraError, match=r"'ml'.*missing: SimpleITK"):
        registry.load("ct-registration")


BASE_INSTALL = "import sys\nfor m in ('SimpleITK', 'torch', 'monai'):\n    sys.modules[m] = None\n"


def test_base_install_refuses_models_that_need_an_extra(tmp_path: Path) -> None:
    """Without the ml extra: check-config exits 2 naming the extra and the module; `models` marks them."""
    cfg = tmp_path / "node.yaml"
    remote = tmp_path / "remote.yaml"
    rules = [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-hu-segmentation", "ct-registration"]}]
    cfg.write_text(yaml.safe_dump({"node": {"storage_dir": str(tmp_path / "s")}, "rules": rules}))
    remote.write_text(yaml.safe_dump({"node": {"storage_dir": str(tmp_path / "s")}, "rules": rules,
                                      "queue": {"embedded_workers": False}}))
    code = BASE_INSTALL + (
        "from node.cli import main\n"
        f"rc = main(['check-config', '-c', {str(cfg)!r}])\n"
        f"rc_remote = main(['check-config', '-c', {str(remote)!r}])\n"
        "main(['models'])\n"
        "print('RC', rc, rc_remote)\n"
        "assert not any(sys.modules.get(m) for m in ('SimpleITK', 'torch', 'monai'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "RC 2 0" in done.stdout  # workers elsewhere (embedded_workers: false) may have the extra
    assert (
        "models.ct-registration: needs the optional extra 'ml' (pip install 'dicom-ai-node[ml]'); missing: SimpleITK"
        in done.stderr
    )
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith(("ct-", "dl-"))}
    assert lines["ct-registration"].endswith("(needs extra ml: missing SimpleITK)")
    assert lines["dl-ct-segmentation"].endswith("(needs extra ml: missing torch, monai)")
    assert "needs extra" not in lines["ct-hu-segmentation"]
