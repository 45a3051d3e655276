"""The rule dry run (node.rules_check): each condition explained with routing's own verdict, the jobs
planned exactly as routing plans them, files and directories read as the receiver reads them, a
catalog study planned by the router itself, and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from models import registry
from models.errors import InputError
from node.catalog import Catalog
from node.config import Rule, Settings, parse_settings
from node.receive.scp import STATUS_SUCCESS, Receiver
from node.route import Router, plan_jobs, rule_matches
from node.rules_check import (
    UnknownStudy,
    check_files,
    check_paths,
    check_study,
    check_target,
    explain_condition,
    render_text,
)
from node.schema import StudyState
from node.spool import Spool
from tests.dsfactory import ct_slice, encode

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY = "1.2.826.0.1.77.1"


def settings_for(tmp_path: Path, rules: list[dict[str, Any]], **extra: Any) -> Settings:
    return parse_settings({
        "node": {"storage_dir": str(tmp_path / "storage"), "min_free_mb": 0},
        "destinations": [
            {"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            {"name": "archive", "type": "dimse", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 105},
        ],
        "rules": rules,
        **extra,
    })


def write_series(folder: Path, series: str, n: int, **attrs: Any) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds = ct_slice(STUDY, series, f"{series}.{i + 1}", z=float(i))
        ds.SeriesNumber = series.rsplit(".", 1)[-1]
        for k, v in attrs.items():
            setattr(ds, k, v)
        path = folder / f"{i + 1:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ---- each condition ----------------------------------------------------------------------------
ATTRS = {"Modality": "MR", "SeriesDescription": "Lung 1mm", "SliceThickness": 5.0, "NumberOfInstances": 20,
         "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"], "ProtocolName": "thin"}


@pytest.mark.parametrize(("key", "wanted", "held", "reason"), [
    ("Modality", "CT", False, "Modality is 'MR', rule wants 'CT'"),
    ("Modality", "mr", True, "Modality is 'MR' (rule wants 'mr')"),
    ("Modality", ["CT", "PT"], False, "Modality is 'MR', rule wants one of 'CT', 'PT'"),
    ("Modality", ["CT", "MR"], True, "Modality is 'MR' (rule wants one of 'CT', 'MR')"),
    ("SeriesDescription", {"regex": "thorax.*"}, False,
     "SeriesDescription 'Lung 1mm' does not match /thorax.*/ (the whole value must match, any case)"),
    ("SeriesDescription", {"regex": "lung.*"}, True, "SeriesDescription is 'Lung 1mm' (rule wants matching /lung.*/)"),
    ("SliceThickness", {"max": 3.0}, False, "SliceThickness 5.0 is above max 3.0"),
    ("NumberOfInstances", {"min": 50}, False, "NumberOfInstances 20 is below min 50.0"),
    ("SliceThickness", {"min": 1, "max": 5}, True, "SliceThickness is 5.0 (rule wants between 1.0 and 5.0)"),
    ("ProtocolName", {"max": 3}, False, "ProtocolName is 'thin', not a number; rule wants at most 3.0"),
    ("ProtocolName", 3, False, "ProtocolName is 'thin', not a number; rule wants 3"),
    ("ImageType", "AXIAL", False, "none of ImageType's values ORIGINAL\\PRIMARY\\LOCALIZER is 'AXIAL'"),
    ("ImageType", "localizer", True, "ImageType ORIGINAL\\PRIMARY\\LOCALIZER has a value 'localizer'"),
    ("BodyPartExamined", "CHEST", False, "BodyPartExamined is missing"),
    ("CallingAETitle", "CT_ROOM_1", False,
     "CallingAETitle is missing (files have no sender: give the calling AE title to test it)"),
])
def test_each_condition_is_explained_with_routings_verdict(key: str, wanted: Any, held: bool, reason: str) -> None:
    rule = Rule.model_validate({"name": "r", "match": {key: wanted}, "models": ["m"]})
    check = explain_condition(key, rule.match[key], ATTRS)
    assert check.held is held is rule_matches(rule, ATTRS)
    assert check.reason == reason
    assert check.actual == ATTRS.get(key)


def test_first_rule_wins_per_model_and_destinations_merge_as_routing_does(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, [
        {"name": "ct-seg", "match": {"Modality": "CT"}, "models": ["ct-hu-segmentation"], "send_to": ["pacs"]},
        {"name": "ct-all", "match": {"Modality": "CT", "BodyPartExamined": "CHEST"},
         "models": ["ct-hu-segmentation", "ct-lung-nodules"], "send_to": ["archive"]},
        {"name": "thin", "match": {"SliceThickness": {"max": 1.5}}, "models": ["ct-emphysema"]},
        {"name": "mr", "match": {"Modality": "MR"}, "models": ["ct-emphysema"], "send_to": ["pacs"]},
    ])
    write_series(tmp_path / "in", "1.2.826.0.1.77.1.2", 3, SliceThickness=2.5)
    report = check_paths(settings, [tmp_path / "in"])
    [series] = report.series
    assert series.instances == 3 and series.attributes["NumberOfInstances"] == 3
    assert "CallingAETitle" not in series.attributes
    assert [r.matched for r in series.rules] == [True, True, False, False]
    assert series.rules[2].conditions[0].reason == "SliceThickness 2.5 is above max 1.5"
    expected = plan_jobs(settings.rules, [(0, series.attributes)])
    assert [(j.model, j.rule, tuple(j.destinations)) for j in report.jobs] == \
        [(s.model, s.rule, s.destinations) for s in expected]
    assert [(j.model, j.rule, j.destinations) for j in report.jobs] == [
        ("ct-hu-segmentation", "ct-seg", ["pacs", "archive"]), ("ct-lung-nodules", "ct-all", ["archive"])]
    nodules = report.jobs[1]
    assert nodules.awaits_prior is False and nodules.series == "1.2.826.0.1.77.1.2"
    assert nodules.notes == ["ct-lung-nodules needs at least 10 slices; this series has 3 instances"]
    assert report.jobs[0].notes == []
    assert {m.name: (m.modalities, m.min_slices) for m in report.models} == {
        "ct-hu-segmentation": (["CT"], 3), "ct-lung-nodules": (["CT"], 10)}
    json.dumps(report.to_dict())  # JSON-able
    text = "\n".join(render_text(report))
    assert "MATCH    ct-seg -> ct-hu-segmentation to pacs" in text
    assert "no match thin: SliceThickness 2.5 is above max 1.5" in text
    assert "  series 2 (CT, 3 instances) in in: ct-hu-segmentation (rule ct-seg) -> pacs, archive" in text
    assert "    ! ct-lung-nodules needs at least 10 slices; this series has 3 instances" in text


def test_directory_groups_instances_by_series_and_lists_what_the_node_would_refuse(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, [
        {"name": "ct", "match": {"Modality": "CT", "CallingAETitle": "CT_ROOM_1"}, "models": ["ct-hu-segmentation"]},
    ])
    root = tmp_path / "export"
    a = write_series(root / "a", "1.2.826.0.1.77.1.3", 4)
    write_series(root / "b", "1.2.826.0.1.77.1.4", 2, Modality="MR", SeriesDescription="T1 AX")
    odd = ct_slice(STUDY, "1.2.826.0.1.77.1.3", "1.2.826.0.1.77.1.3.9", z=9.0)
    odd.ImageType = ["DERIVED", "SECONDARY"]
    odd.save_as(root / "a" / "zz.dcm", enforce_file_format=True)
    shutil.copy(a[0], root / "copy-of-first.dcm")  # the same instance again: stored once
    (root / "notes.txt").write_text("not DICOM")
    truncated = ct_slice(STUDY, "1.2.826.0.1.77.1.3", "1.2.826.0.1.77.1.3.10")
    truncated.PixelData = b"\0" * 10
    truncated.save_as(root / "truncated.dcm", enforce_file_format=True)
    no_uid = ct_slice(STUDY, "1.2.826.0.1.77.1.3", "1.2.826.0.1.77.1.3.11")
    del no_uid.SeriesInstanceUID
    no_uid.save_as(root / "no-series.dcm", enforce_file_format=True)

    report = check_paths(settings, [root], calling_ae="CT_ROOM_1")
    by_key = {s.key: s for s in report.series}
    ct, mr = by_key["1.2.826.0.1.77.1.3"], by_key["1.2.826.0.1.77.1.4"]
    assert ct.instances == 5 and mr.instances == 2
    assert ct.attributes["CallingAETitle"] == "CT_ROOM_1" and ct.attributes["ImageType"] == ["ORIGINAL", "PRIMARY",
                                                                                               "AXIAL"]
    assert ct.notes == ["ImageType differs between instances: the node records the first instance it receives"]
    assert ct.label == "series 3 (CT, 5 instances) in export/a"
    assert mr.rules[0].conditions[0].reason == "Modality is 'MR', rule wants 'CT'"
    assert [(j.series, j.model) for j in report.jobs] == [("1.2.826.0.1.77.1.3", "ct-hu-segmentation")]
    assert {f.path: f.reason for f in report.skipped} == {
        "export/notes.txt": "not a DICOM file (no DICM preamble)",
        "export/truncated.dcm": "the node would refuse it: Pixel Data has 10 bytes, 512 expected",
        "export/no-series.dcm": "missing or invalid Study/Series/SOP Instance UID: the node would refuse it",
    }
    without_sender = check_paths(settings, [root])
    assert without_sender.jobs == [] and "no rule matches any series" in without_sender.notes[0]


def test_model_limits_install_and_paused_destinations_are_noted(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(tmp_path, [
        {"name": "any", "match": {}, "models": ["ct-hu-segmentation"], "send_to": ["pacs"]},
    ])
    catalog = Catalog.for_storage(tmp_path)
    catalog.set_destination_paused("pacs", True, 1.0)
    monkeypatch.setattr(registry, "missing_modules", lambda name: ["torch"])
    files = write_series(tmp_path / "mr", "1.2.826.0.1.77.1.5", 1, Modality="MR")
    report = check_files(settings, [(files[0], "upload.dcm")], catalog=catalog)
    [job] = report.jobs
    assert job.notes[0] == ("ct-hu-segmentation takes CT only; this series is MR: the job would end skipped as "
                            "unsuitable")
    assert job.notes[1] == ("ct-hu-segmentation needs torch, not installed on this host: only a worker elsewhere "
                            "serving queue 'cpu' can run it")
    assert job.notes[2] == "destination 'pacs' is paused: its results wait until it is resumed"
    catalog.engine.dispose()


def _stored_study(tmp_path: Path, settings: Settings, n: int) -> tuple[Catalog, Spool, int]:
    catalog, spool = Catalog.for_storage(settings.node.storage_dir), Spool(settings.node.storage_dir)
    receiver = Receiver(settings, catalog, spool, lambda: 100.0)
    for i in range(n):
        ds: Dataset = ct_slice(STUDY, f"{STUDY}.1", f"{STUDY}.1.{i + 1}", z=float(i))
        ds.SliceThickness = 1.0
        assert receiver.store(encode(ds), CT, ds.SOPInstanceUID, "CT_ROOM_1") == STATUS_SUCCESS
    [study_id] = catalog.mark_quiet_studies_ready(150.0, now=160.0)
    return catalog, spool, study_id


def test_catalog_study_is_planned_by_the_router_and_no_job_is_created(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, [
        {"name": "follow-up", "match": {"Modality": "CT", "CallingAETitle": "ct_room_1", "SliceThickness": {"max": 3}},
         "models": ["ct-registration", "ct-hu-segmentation"], "send_to": ["pacs"]},
    ], priors={"source": "pacs"})
    catalog, spool, study_id = _stored_study(tmp_path, settings, 3)
    files_before = sorted(p for p in spool.root.rglob("*") if p.is_file())
    report = check_study(settings, catalog, study_id)
    [series] = catalog.series_of_study(study_id)
    assert report.source == "study" and report.study_id == study_id and report.study_state == "ready"
    assert [s.key for s in report.series] == [f"#{series.id}"]
    assert report.series[0].attributes == series.routing_attributes
    router = Router(catalog, settings.rules, lambda: 0.0, priors_from_pacs=True)
    planned = router.plan(study_id, [(series.id, series.routing_attributes)])
    assert [(j.model, j.rule, tuple(j.destinations), j.awaits_prior) for j in report.jobs] == \
        [(s.model, s.rule, s.destinations, s.awaits_prior) for s in planned]
    assert report.jobs[0].model == "ct-registration" and report.jobs[0].awaits_prior is True
    assert catalog.jobs_of_study(study_id) == []
    study = catalog.get_study(study_id)
    assert study is not None and study.state == StudyState.READY and study.routed_at is None
    assert sorted(p for p in spool.root.rglob("*") if p.is_file()) == files_before
    with pytest.raises(UnknownStudy, match="no study #999"):
        check_study(settings, catalog, 999)
    catalog.engine.dispose()


def test_target_is_a_path_else_a_study_id(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-hu-segmentation"]}])
    catalog, _, study_id = _stored_study(tmp_path, settings, 1)
    files = write_series(tmp_path / "one", "1.2.826.0.1.77.1.6", 1)
    assert check_target(settings, str(files[0])).source == "files"
    by_id = check_target(settings, f"#{study_id}", catalog=catalog)
    assert by_id.study_id == study_id and [j.model for j in by_id.jobs] == ["ct-hu-segmentation"]
    assert check_target(settings, str(study_id), catalog=catalog).study_id == study_id
    with pytest.raises(InputError, match="not a study id"):
        check_target(settings, str(tmp_path / "missing"), catalog=catalog)
    with pytest.raises(InputError, match="needs the node's catalog"):
        check_target(settings, "7")
    with pytest.raises(InputError, match="no such file"):
        check_paths(settings, [tmp_path / "missing"])
    empty = check_paths(settings, [tmp_path / "one" / "001.dcm", tmp_path / "one"])
    assert empty.series[0].instances == 1  # the same file twice is one instance
    catalog.engine.dispose()
