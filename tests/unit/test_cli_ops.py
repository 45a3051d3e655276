"""``dicom-node purge [--dry-run]`` and ``dicom-node rules test`` on a real catalog and spool: the CLI
wiring of :mod:`node.lifecycle` and :mod:`node.rules_check` (their logic is tested with them)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from node.cli import main
from node.config import load_settings
from node.lifecycle.guard import NodeLock
from node.rules_check import check_study
from tests.dsfactory import ct_slice, encode
from tests.unit.test_cli import PHI, Seeded, seed

DAY = 86400.0
RULES = [{"name": "ct-chest", "match": {"Modality": "CT", "BodyPartExamined": ["CHEST", "LUNG"]},
          "models": ["ct-hu-segmentation"], "send_to": ["pacs"]},
         {"name": "mr-thin", "match": {"Modality": "MR", "SliceThickness": {"max": 3}}, "models": ["ct-lung-nodules"]}]


def _out(capsys: pytest.CaptureFixture[str], *argv: str, rc: int = 0) -> str:
    assert main(list(argv)) == rc
    out = capsys.readouterr()
    assert not any(v in out.out or v in out.err for v in PHI)
    return out.out + out.err


@pytest.fixture
def settled(tmp_path: Path) -> Seeded:
    """The seeded catalog ten days ago, every delivery since sent, results older than retention allows."""
    s = seed(tmp_path, time.time() - 10 * DAY, storage={"retention": {"results_days": 2, "failed_days": 2}})
    for d, _r, _study in s.catalog.due_deliveries(float("inf")):
        s.catalog.delivery_sent(d.id, time.time() - 9 * DAY)
    for name in ("seg", "sr"):
        result = tmp_path / "s" / "results" / "a" / f"{name}.dcm"
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_bytes(b"result")
    return s


def test_purge_dry_run_then_refused_while_the_node_runs_then_done(settled: Seeded,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(settled.config)
    storage = load_settings(settled.config).node.storage_dir
    files_before = sorted(p for p in storage.rglob("*.dcm"))
    assert len(files_before) == 6  # 3 + 1 instances, 2 results
    counts = settled.catalog.counts()

    text = _out(capsys, "purge", "--dry-run", "-c", cfg)
    [row] = [line.split() for line in text.splitlines() if line.startswith(f"#{settled.study_id} ")]
    assert row[1:3] == ["whole", "study"] and row[3] in ("results_days", "failed_days") and row[5] == "5"
    assert "kept: 1 receiving" in text and "dry run: nothing was removed." in text
    plan = json.loads(_out(capsys, "purge", "--dry-run", "--retention-only", "--json", "-c", cfg))["plan"]
    assert [i["study_id"] for i in plan["items"]] == [settled.study_id] and plan["usage"] is None
    assert settled.catalog.counts() == counts and sorted(storage.rglob("*.dcm")) == files_before

    lock = NodeLock(storage)  # what the running node holds
    assert lock.acquire()
    try:
        text = _out(capsys, "purge", "-c", cfg, rc=1)
    finally:
        lock.release()
    assert "the node is running on" in text and "POST /api/v1/storage/purge" in text
    assert settled.catalog.counts() == counts

    text = _out(capsys, "purge", "-c", cfg)
    assert "purged 1 study(ies): 5 file(s)" in text
    assert settled.catalog.get_study(settled.study_id) is None
    assert [p.name for p in storage.rglob("*.dcm")] == ["1.2.826.0.1.3680043.99.42.1.1.dcm"]  # the receiving one
    assert settled.catalog.counts()["studies"] == {"receiving": 1}


def test_rules_dry_run_on_a_study_and_on_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = seed(tmp_path, rules=RULES)
    cfg = str(s.config)
    counts = s.catalog.counts()
    text = _out(capsys, "rules", "test", str(s.study_id), "-c", cfg)
    lines = [line.split() for line in text.splitlines()]
    assert next(x for x in lines if x[:1] == ["ct-chest"])[:6] == ["ct-chest", "MATCH", "ok", "BodyPartExamined",
                                                                   "is", "'CHEST'"]
    assert "FAIL Modality is 'CT', rule wants 'MR'" in text and "FAIL SliceThickness is missing" in text
    assert any(x[-5:] == ["ct-hu-segmentation", "ct-chest", "pacs", "no", "-"] for x in lines)  # the job
    assert "dry run: no job was created." in text
    report = json.loads(_out(capsys, "rules", "test", f"#{s.study_id}", "--json", "-c", cfg))
    assert report == check_study(load_settings(s.config), s.catalog, s.study_id).to_dict()
    assert [(j["model"], j["destinations"]) for j in report["jobs"]] == [("ct-hu-segmentation", ["pacs"])]

    folder = tmp_path / "incoming"
    folder.mkdir()
    for i in range(2):
        ds = ct_slice("1.2.826.0.1.3680043.99.77", "1.2.826.0.1.3680043.99.77.1", f"1.2.826.0.1.3680043.99.77.1.{i}",
                      z=float(i))
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI
        ds.Modality, ds.SliceThickness = "MR", 5.0
        (folder / f"{i}.dcm").write_bytes(encode(ds))
    (folder / "notes.txt").write_text("not DICOM")
    text = _out(capsys, "rules", "test", str(folder), "-c", cfg)
    assert "(MR, 2 instances)" in text and "FAIL SliceThickness 5.0 is above max 3" in text.replace("3.0", "3")
    assert "jobs routing would create: none" in text and "notes.txt" in text
    assert s.catalog.counts() == counts  # nothing was created

    assert "no study #999" in _out(capsys, "rules", "test", "999", "-c", cfg, rc=1)
    assert "no such file or directory" in _out(capsys, "rules", "test", str(tmp_path / "nope"), "-c", cfg, rc=2)
