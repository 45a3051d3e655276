"""The audit trail (node.audit): the record shape after the DICOM audit message schema, one JSON line
per record, the events each hook turns into records, rotation, and ``dicom-node audit``."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from models.errors import ConfigError
from node.audit import (
    AUDIT_FILE,
    AuditFile,
    AuditRecord,
    AuditTrail,
    audit_dir,
    audit_files,
)
from node.audit_read import read_records
from node.cli import main
from node.config import AuditSyslogSettings, Settings, parse_settings
from node.http.audit import HttpAudited, Requestor
from node.receive.scp import AssociationEvent, InstancesReceived
from node.retrieve import PriorExchange
from node.send.deliver import DeliveryBatch

CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
STUDY = "1.2.826.0.1.3680043.8.498.1"
T0 = dt.datetime(2026, 12, 1, 9, 30, tzinfo=dt.UTC).timestamp()


def settings_for(tmp_path: Path, **audit: Any) -> Settings:
    return parse_settings({
        "node": {"ae_title": "AI-NODE", "storage_dir": str(tmp_path)},
        "destinations": [{"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "10.0.0.9", "port": 104},
                         {"name": "web", "type": "dicomweb", "url": "https://archive.example:8443/dicom-web"}],
        "audit": {"site_id": "St. Example", **audit},
    })


def lines(settings: Settings) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (audit_dir(settings) / AUDIT_FILE).read_text().splitlines()]


@pytest.fixture
def trail(tmp_path: Path) -> AuditTrail:
    return AuditTrail(settings_for(tmp_path), clock=lambda: T0)


def test_instances_received_record_shape_and_json_line(trail: AuditTrail) -> None:
    trail.instances_received(InstancesReceived("dimse", "CT1", "10.1.2.3", {STUDY: {CT: 30}}, 2))
    raw = (audit_dir(trail.settings) / AUDIT_FILE).read_text()
    assert raw.count("\n") == 1 and raw.endswith("}\n")  # one record, one line
    [rec] = lines(trail.settings)
    event = rec["EventIdentification"]
    assert event["EventID"] == {"csd-code": "110104", "codeSystemName": "DCM",
                                "originalText": "DICOM Instances Transferred"}
    assert event["EventActionCode"] == "C"
    assert event["EventOutcomeIndicator"] == 4  # some failed
    assert dt.datetime.fromisoformat(event["EventDateTime"]).timestamp() == T0
    assert "2 failed" in event["EventOutcomeDescription"]
    source, destination = rec["ActiveParticipant"]
    assert source["UserID"] == "CT1" and source["UserIsRequestor"] is True
    assert source["NetworkAccessPointID"] == "10.1.2.3" and source["NetworkAccessPointTypeCode"] == 2
    assert source["RoleIDCode"][0]["csd-code"] == "110153"
    assert destination["UserID"] == "AI-NODE" and destination["UserIsRequestor"] is False
    assert destination["RoleIDCode"][0]["csd-code"] == "110152"
    assert rec["AuditSourceIdentification"] == {"AuditSourceID": "AI-NODE", "AuditEnterpriseSiteID": "St. Example",
                                                "AuditSourceTypeCode": 4}
    [study] = rec["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == STUDY
    assert study["ParticipantObjectIDTypeCode"]["csd-code"] == "110180"
    assert (study["ParticipantObjectTypeCode"], study["ParticipantObjectTypeCodeRole"]) == (2, 3)
    assert study["ParticipantObjectDescription"] == {"NumberOfInstances": 30,
                                                     "SOPClass": [{"UID": CT, "NumberOfInstances": 30}]}
    assert AuditRecord.from_json(rec).to_json() == rec  # what the CLI reads back is what was written


def test_every_hook_gives_its_coded_event(trail: AuditTrail) -> None:
    who = Requestor("alice", "operator", "token", "192.0.2.7")
    trail.application_started()
    trail.association(AssociationEvent(True, "CT1", "AI-NODE", "10.0.0.5", 40000, False,
                                       allow=frozenset({"echo", "store"})))
    trail.association(AssociationEvent(False, "EVIL", "AI-NODE", "10.0.0.6", 40001, False, "unknown calling AE"))
    trail.association(AssociationEvent(False, "", "", "10.0.0.7", 40002, True, "TLS handshake failed: bad cert"))
    trail.instances_received(InstancesReceived("stow", "alice", "192.0.2.7", {STUDY: {CT: 3}}, 0, "token"))
    trail.delivered(DeliveryBatch("pacs", {STUDY: {SEG: 1}}, 0))
    trail.delivered(DeliveryBatch("web", {}, 2, "HTTP 503"))
    trail.prior_exchange(PriorExchange("find", "pacs", "STUDY", ("PatientID", "StudyDate"), count=2))
    trail.prior_exchange(PriorExchange("move", "pacs", study_uid=STUDY, count=20))
    trail.prior_exchange(PriorExchange("get", "pacs", study_uid=STUDY, count=19, failed=1))
    trail.prior_exchange(PriorExchange("find", "pacs", "STUDY", error="no association with pacs"))
    trail.http(HttpAudited("query", "GET", "/dicom-web/studies", 200, who, query_keys=("PatientName",),
                           level="STUDY"))
    trail.http(HttpAudited("retrieve", "GET", "/dicom-web/studies/{study}", 200, who, (STUDY,)))
    trail.http(HttpAudited("access", "GET", "/api/v1/studies/{study_id}/dicom", 200, who, (STUDY,)))
    trail.http(HttpAudited("action", "POST", "/api/v1/studies/{study_id}/rerun", 202, who, (STUDY,),
                           action="study-rerun"))
    trail.http(HttpAudited("action", "POST", "/api/v1/destinations/{name}/pause", 200, who,
                           action="destination-pause", target=("destination", "pacs")))
    trail.http(HttpAudited("unauthenticated", "GET", "/metrics", 401, Requestor(None, None, None, "192.0.2.8")))
    trail.http(HttpAudited("forbidden", "POST", "/api/v1/jobs/{job_id}/retry", 403,
                           Requestor("bob", "viewer", "oidc", "192.0.2.9")))
    trail.application_stopped()
    got = [(r["EventIdentification"]["EventID"]["csd-code"], r["EventIdentification"]["EventActionCode"],
            r["EventIdentification"]["EventOutcomeIndicator"],
            [c["csd-code"] for c in r["EventIdentification"].get("EventTypeCode", [])]) for r in lines(trail.settings)]
    assert got == [
        ("110100", "E", 0, ["110120"]),  # application start
        ("110114", "E", 0, ["110122"]),  # association accepted: a node's login
        ("110113", "E", 4, ["110126"]),  # association rejected: node authentication failed
        ("110113", "E", 4, ["110126"]),  # TLS handshake failed
        ("110104", "C", 0, []),  # STOW-RS in
        ("110104", "C", 0, []),  # delivered out
        ("110104", "C", 8, []),  # nothing delivered
        ("110112", "E", 0, []),  # C-FIND for a prior
        ("110102", "E", 0, []),  # C-MOVE of a prior
        ("110102", "E", 4, []),  # C-GET of a prior, one failed...
        ("110104", "C", 4, []),  # ...whose instances came on the node's own association
        ("110112", "E", 8, []),  # C-FIND failed
        ("110112", "E", 0, []),  # QIDO-RS
        ("110104", "R", 0, []),  # WADO-RS
        ("110103", "R", 0, []),  # /api/v1/studies/{id}/dicom
        ("110100", "E", 0, ["study-rerun"]),
        ("110100", "U", 0, ["destination-pause"]),
        ("110114", "E", 4, ["110122"]),  # 401
        ("110113", "E", 4, ["110132"]),  # 403
        ("110100", "E", 0, ["110121"]),  # application stop
    ]
    recs = lines(trail.settings)
    stow = recs[4]["ActiveParticipant"][0]
    assert (stow["UserID"], stow["AlternativeUserID"], stow["NetworkAccessPointID"]) == ("alice", "token", "192.0.2.7")
    out = recs[5]["ActiveParticipant"]
    assert [(p["UserID"], p["UserIsRequestor"]) for p in out] == [("AI-NODE", True), ("PACS", False)]
    assert out[1]["NetworkAccessPointID"] == "10.0.0.9" and out[1]["UserName"] == "pacs"
    assert recs[6]["ActiveParticipant"][1]["NetworkAccessPointID"] == "archive.example"
    assert recs[6]["ActiveParticipant"][1]["NetworkAccessPointTypeCode"] == 1  # a host name
    query = recs[12]["ParticipantObjectIdentification"][0]
    assert query["ParticipantObjectTypeCodeRole"] == 24 and query["ParticipantObjectIDTypeCode"]["csd-code"] == "110181"
    assert {"type": "QueryKeys", "value": "PatientName"} in query["ParticipantObjectDetail"]
    assert recs[12]["ActiveParticipant"][0]["RoleIDCode"][0]["csd-code"] == "operator"
    assert recs[17]["ActiveParticipant"][0]["UserID"] == "anonymous"
    assert recs[18]["ActiveParticipant"][0]["UserID"] == "bob"
    assert "pause" in recs[16]["EventIdentification"]["EventTypeCode"][0]["originalText"]
    assert recs[16]["ParticipantObjectIdentification"][0]["ParticipantObjectID"] == "pacs"


def test_nothing_to_record_for_an_association_that_stored_nothing(trail: AuditTrail) -> None:
    trail.instances_received(InstancesReceived("dimse", "CT1", "10.1.2.3", {}, 0))
    assert not (audit_dir(trail.settings) / AUDIT_FILE).exists()


def test_a_failing_file_never_raises(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "storage")
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "audit").write_text("a file where the directory should be")
    trail = AuditTrail(settings)
    trail.application_started()
    assert trail.failures == 1


def test_rotation_keeps_n_files_and_reads_them_in_order(tmp_path: Path) -> None:
    f = AuditFile(tmp_path / AUDIT_FILE, max_bytes=300, keep=2)
    for i in range(40):
        f.append(json.dumps({"n": i, "pad": "x" * 40}))
    f.close()
    files = audit_files(tmp_path)
    assert [p.name for p in files] == [f"{AUDIT_FILE}.2", f"{AUDIT_FILE}.1", AUDIT_FILE]
    assert all(p.stat().st_size <= 300 for p in files)
    numbers = [json.loads(x)["n"] for p in files for x in p.read_text().splitlines()]
    assert numbers == list(range(40 - len(numbers), 40))  # the newest, in order, none torn
    assert (tmp_path / AUDIT_FILE).stat().st_mode & 0o777 == 0o640


def test_fsync_per_record_when_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import node.audit as audit

    synced: list[int] = []
    monkeypatch.setattr(audit.os, "fsync", synced.append)
    trail = AuditTrail(settings_for(tmp_path, fsync=True))
    trail.application_started()
    trail.application_stopped()
    assert len(synced) == 2
    plain = AuditTrail(settings_for(tmp_path / "b"))
    plain.application_started()
    assert len(synced) == 2  # default: written to the OS per record, fsynced at rotation and close
    plain.close()
    assert len(synced) == 3


def _config(tmp_path: Path, **audit: Any) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"node": {"ae_title": "AI-NODE", "storage_dir": str(tmp_path / "s")},
                                    "audit": audit}))
    return path


def test_cli_lists_records_since_a_time_across_rotated_files(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, max_mb=0.002, keep=20)  # ~2 KB per file: rotates every few records
    settings = parse_settings(yaml.safe_load(config.read_text()))
    clock = [dt.datetime(2026, 11, 30, 23, 0, tzinfo=dt.UTC).timestamp()]
    trail = AuditTrail(settings, clock=lambda: clock[0])
    trail.application_started()
    for i in range(12):
        clock[0] += 600  # every ten minutes from 23:10
        trail.instances_received(InstancesReceived("dimse", f"CT{i}", "10.0.0.5", {f"{STUDY}.{i}": {CT: i + 1}}, 0))
    trail.http(HttpAudited("query", "GET", "/dicom-web/studies", 200, Requestor("alice", "viewer", "token", None)))
    trail.application_stopped()
    trail.close()
    assert len(audit_files(audit_dir(settings))) > 2

    assert main(["audit", "-c", str(config), "--since", "2026-12-01T00:00+00:00"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["time", "event", "action", "outcome"]
    rows = table[1:]
    assert len(rows) == 12 - 5 + 2  # 00:00 .. 01:10 (7 transfers), the query, the stop
    assert all("2026-12-01" in r for r in rows[:-2]) and f"{STUDY}.5 (6)" in rows[0] and "CT5@10.0.0.5" in rows[0]

    assert main(["audit", "-c", str(config), "--event", "query", "--json"]) == 0
    [only] = capsys.readouterr().out.splitlines()
    assert json.loads(only)["EventIdentification"]["EventID"]["csd-code"] == "110112"

    assert main(["audit", "-c", str(config), "--event", "Application Stop", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert len(list(read_records(audit_dir(settings), event="110104"))) == 12
    assert main(["audit", "-c", str(config), "--since", "yesterday"]) == 2


def test_cli_skips_a_torn_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    settings = parse_settings(yaml.safe_load(config.read_text()))
    trail = AuditTrail(settings, clock=lambda: T0)
    trail.application_started()
    trail.close()
    with (audit_dir(settings) / AUDIT_FILE).open("a") as f:
        f.write('{"EventIdentification": {"EventID"')  # a crash in the middle of a write
    assert main(["audit", "-c", str(config), "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_the_commented_example_is_valid() -> None:
    text = (Path(__file__).resolve().parents[2] / "deploy" / "config.example.yaml").read_text()
    block = text[text.index("\naudit:"):text.index("\nlogging:")]
    audit = yaml.safe_load(block.replace("\n  # ", "\n  ").replace("\n  #   ", "\n    "))["audit"]
    assert set(audit["syslog"]) == set(AuditSyslogSettings.model_fields)
    settings = parse_settings({"node": {"storage_dir": "/srv/dicom-node"}, "audit": audit})
    assert settings.audit.syslog is not None and settings.audit.syslog.protocol == "tls"


def test_unusable_syslog_tls_files_are_a_config_error(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, syslog={"host": "127.0.0.1", "ca_file": str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigError, match=r"audit\.syslog"):
        AuditTrail.from_settings(settings)
