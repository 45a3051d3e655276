"""PHI hygiene, end to end: a study with a distinctive patient name, ID and birth date goes through the
whole node (storescu -> dicom-node -> ct-hu-segmentation -> Orthanc), a second one arrives by STOW-RS,
and a viewer, an operator and strangers use QIDO-RS, WADO-RS, the REST API and /metrics. Afterwards
none of the three values (nor the name's components) may appear in the node's and workers' logs, the
audit trail, /metrics, or any API response that does not ask for DICOM attributes; QIDO-RS must
return them (so they were there to leak). The audit trail must hold one record per expected event,
with its fields filled: start, association accepted, instances in (DIMSE and STOW-RS, one record per
association / request), query, retrieve, instances out, actions, 401/403, stop at shutdown."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from node.receive.stow import stow_request
from testkit.dicom import write_ct_series
from testkit.harness import (
    NODE_AE,
    ORTHANC_AE,
    SCANNER_AE,
    VENV_BIN,
    Orthanc,
    bearer,
    create_token,
    free_port,
    node_config,
    start_node_process,
    stop_process,
    storescu,
    wait_for,
)
from testkit.phantom import make_ct_phantom

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PATIENT_NAME = "Zyxwvut^Kqjhaph"
PATIENT_ID = "PHI-7731-XQ"
BIRTH_DATE = "19411207"
NEEDLES = (PATIENT_NAME, "Zyxwvut", "Kqjhaph", PATIENT_ID, BIRTH_DATE, "1941-12-07")
"""What must not leak: the values, the name's components, the birth date in ISO form (matched without case)."""
N_SLICES, N_STOW = 30, 3


@dataclass
class PhiStack:
    workdir: Path
    config: Path
    node_port: int
    api: str
    orthanc: Orthanc
    node: subprocess.Popen[bytes]
    tokens: dict[str, str]
    responses: dict[str, str]
    """Every response body that must be free of PHI, by request."""

    def call(self, method: str, path: str, role: str | None, **kw: Any) -> httpx.Response:
        headers = {**kw.pop("headers", {}), **(bearer(self.tokens[role]) if role else {})}
        return httpx.request(method, self.api + path, headers=headers, timeout=30, **kw)

    def clean(self, method: str, path: str, role: str | None, status: int = 200, **kw: Any) -> Any:
        """A request whose answer must carry no patient data (kept for the final grep)."""
        r = self.call(method, path, role, **kw)
        assert r.status_code == status, (path, r.status_code, r.text[:500])
        self.responses[f"{method} {path} ({role})"] = r.text
        return r.json() if r.headers.get("content-type", "").endswith("json") else r.text

    def logs(self) -> dict[str, str]:
        return {p.name: p.read_text(errors="replace") for p in sorted(self.workdir.glob("*.log"))}

    def audit_files(self) -> dict[str, str]:
        return {p.name: p.read_text(errors="replace")
                for p in sorted((self.workdir / "node-storage" / "audit").glob("audit.log*"))}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[PhiStack]:
    node_port, http_port = free_port(), free_port()
    orthanc = Orthanc(tmp_path, node_port=node_port).start()
    node: subprocess.Popen[bytes] | None = None
    try:
        cfg = node_config(tmp_path, node_port=node_port, orthanc=orthanc, quiet_seconds=2.0, http_port=http_port)
        tokens = {role: create_token(cfg, role, f"phi-{role}") for role in ("sender", "viewer", "operator")}
        node = start_node_process(cfg, "run", "node.log", port=node_port)
        api = f"http://127.0.0.1:{http_port}"
        wait_for(lambda: httpx.get(f"{api}/healthz", timeout=2).status_code == 200, 60, what="HTTP service")
        yield PhiStack(tmp_path, cfg, node_port, api, orthanc, node, tokens, {})
    finally:
        if node is not None:
            stop_process(node)
        orthanc.stop()


def _series(tmp: Path, n: int, seed: str, modality: str = "CT") -> tuple[str, list[Path]]:
    """A phantom series with the distinctive patient attributes on every file (valid PN, LO, DA)."""
    phantom = make_ct_phantom(n_slices=n, rows=128, cols=128, pixel_mm=3.0, seed=11)
    files = write_ct_series(phantom, tmp, patient_id=PATIENT_ID, patient_name=PATIENT_NAME, uid_seed=seed)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
        ds.Modality = modality
        ds.save_as(f, enforce_file_format=True)
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files


def _leaks(texts: dict[str, str]) -> list[str]:
    return [f"{where}: {needle}" for where, text in texts.items() for needle in NEEDLES
            if needle.lower() in text.lower()]


def _code(rec: dict[str, Any]) -> str:
    return str(rec["EventIdentification"]["EventID"]["csd-code"])


def _types(rec: dict[str, Any]) -> list[str]:
    return [c["csd-code"] for c in rec["EventIdentification"].get("EventTypeCode", [])]


def _requestor(rec: dict[str, Any]) -> str:
    return next(str(p["UserID"]) for p in rec["ActiveParticipant"] if p["UserIsRequestor"])


def _studies(rec: dict[str, Any]) -> dict[str, int | None]:
    return {o["ParticipantObjectID"]: o.get("ParticipantObjectDescription", {}).get("NumberOfInstances")
            for o in rec.get("ParticipantObjectIdentification", [])
            if o["ParticipantObjectIDTypeCode"]["csd-code"] == "110180"}


def test_no_phi_leaks_and_the_audit_trail_records_each_event(stack: PhiStack, tmp_path: Path) -> None:
    # DIMSE: the whole pipeline, results back in the PACS
    study_a, _files = _series(tmp_path / "ct", N_SLICES, "phi-dimse")
    out = storescu(stack.node_port, tmp_path / "ct")
    assert out.returncode == 0, out.stderr

    def delivered() -> bool:
        mods = stack.orthanc.modalities_of_study(study_a)
        if not all(mods.get(m, 0) >= 1 for m in ("SEG", "SR", "OT", "DOC")):
            return False
        items = stack.call("GET", "/api/v1/deliveries", "viewer", params={"limit": 500}).json()["items"]
        return bool(items) and all(d["state"] != "pending" for d in items)

    try:
        wait_for(delivered, 240, interval=0.5, what="results delivered to Orthanc")
    except TimeoutError:
        print("\n".join(stack.logs().values())[-6000:])
        raise
    sent = sum(d["state"] == "sent" for d in stack.clean("GET", "/api/v1/deliveries", "viewer",
                                                         params={"limit": 500})["items"])

    # STOW-RS: a second study of the patient (MR: no rule runs a model on it)
    study_b, stow_files = _series(tmp_path / "stow", N_STOW, "phi-stow", modality="MR")
    status, _ = stow_request(stack.api + "/dicom-web", [f.read_bytes() for f in stow_files],
                             token=stack.tokens["sender"])
    assert status == 200

    # QIDO-RS returns the patient's attributes: proof the values were there to leak
    qido = stack.call("GET", "/dicom-web/studies", "viewer",
                      params={"PatientID": PATIENT_ID, "includefield": "PatientBirthDate"})
    assert qido.status_code == 200
    assert {study_a, study_b} <= {s["0020000D"]["Value"][0] for s in qido.json()}
    assert PATIENT_NAME in qido.text and PATIENT_ID in qido.text and BIRTH_DATE in qido.text
    assert stack.call("GET", f"/dicom-web/studies/{study_a}/metadata", "viewer").status_code == 200  # WADO-RS

    # the REST API without DICOM attributes, /metrics
    studies = stack.clean("GET", "/api/v1/studies", "viewer")["items"]
    ids = {s["study_uid"]: s["id"] for s in studies}
    assert {study_a, study_b} <= set(ids)
    for uid in (study_a, study_b):
        stack.clean("GET", f"/api/v1/studies/{ids[uid]}", "viewer")
    for path in ("/api/v1/jobs", "/api/v1/destinations", "/api/v1/models", "/metrics"):
        stack.clean("GET", path, "viewer")
    jobs = stack.clean("GET", "/api/v1/jobs", "viewer")["items"]
    stack.clean("GET", f"/api/v1/jobs/{jobs[0]['id']}", "viewer")
    dicom = stack.call("GET", f"/api/v1/studies/{ids[study_a]}/dicom", "viewer")  # asks for them: allowed
    assert dicom.status_code == 200 and PATIENT_ID in dicom.text

    # actions, and callers who may not
    stack.clean("POST", "/api/v1/destinations/pacs/pause", "operator")
    stack.clean("POST", "/api/v1/destinations/pacs/resume", "operator")
    stack.clean("GET", "/api/v1/studies", None, status=401)
    stack.clean("POST", "/api/v1/destinations/pacs/pause", "viewer", status=403)

    stop_process(stack.node)  # SIGTERM: the node records its stop
    assert stack.node.returncode == 0

    # no PHI anywhere it must not be
    logs, audit = stack.logs(), stack.audit_files()
    assert "node.log" in logs and "delivered" in logs["node.log"] and "worker process started" in logs["node.log"]
    assert audit
    assert _leaks(logs) == []
    assert _leaks(audit) == []
    assert _leaks(stack.responses) == []

    # the audit trail, through the CLI (rotated files included)
    listing = subprocess.run([str(VENV_BIN / "dicom-node"), "audit", "--json", "-c", str(stack.config)],
                             capture_output=True, text=True, timeout=60, check=True)
    records = [json.loads(x) for x in listing.stdout.splitlines()]
    for rec in records:  # every record has its fields filled
        event = rec["EventIdentification"]
        assert event["EventDateTime"] and event["EventActionCode"] in "CRUDE"
        assert event["EventOutcomeIndicator"] in (0, 4, 8, 12)
        assert rec["AuditSourceIdentification"]["AuditSourceID"] == NODE_AE
        assert rec["ActiveParticipant"] and all(p["UserID"] for p in rec["ActiveParticipant"])
        assert any(p["UserIsRequestor"] for p in rec["ActiveParticipant"])

    def only(pred: Any, what: str) -> dict[str, Any]:
        found = [r for r in records if pred(r)]
        assert len(found) == 1, (what, found)
        return found[0]

    only(lambda r: _code(r) == "110100" and "110120" in _types(r), "start")
    stop = only(lambda r: _code(r) == "110100" and "110121" in _types(r), "stop")
    assert records[-1] == stop
    login = [r for r in records if _code(r) == "110114" and _requestor(r) == SCANNER_AE]
    assert login and all(r["EventIdentification"]["EventOutcomeIndicator"] == 0 for r in login)
    assert login[0]["ActiveParticipant"][0]["NetworkAccessPointID"] == "127.0.0.1"
    dimse_in = only(lambda r: _code(r) == "110104" and _requestor(r) == SCANNER_AE, "instances in (DIMSE)")
    assert _studies(dimse_in) == {study_a: N_SLICES} and dimse_in["EventIdentification"]["EventActionCode"] == "C"
    stow_in = only(lambda r: _code(r) == "110104" and _requestor(r) == "phi-sender", "instances in (STOW-RS)")
    assert _studies(stow_in) == {study_b: N_STOW}
    outs = [r for r in records if _code(r) == "110104" and _requestor(r) == NODE_AE]
    assert outs and all(r["ActiveParticipant"][1]["UserID"] == ORTHANC_AE for r in outs)
    assert sum(n or 0 for r in outs for n in _studies(r).values()) == sent
    assert {uid for r in outs for uid in _studies(r)} == {study_a}
    query = only(lambda r: _code(r) == "110112" and _requestor(r) == "phi-viewer", "query")
    assert "PatientID" in json.dumps(query["ParticipantObjectIdentification"])
    wado = only(lambda r: _code(r) == "110104" and _requestor(r) == "phi-viewer", "WADO-RS")
    assert wado["EventIdentification"]["EventActionCode"] == "R" and _studies(wado) == {study_a: None}
    access = only(lambda r: _code(r) == "110103", "patient attributes read")
    assert _requestor(access) == "phi-viewer" and _studies(access) == {study_a: None}
    for action in ("destination-pause", "destination-resume"):
        assert _requestor(only(lambda r, a=action: a in _types(r), action)) == "phi-operator"
    unauthenticated = only(lambda r: _code(r) == "110114" and r["EventIdentification"]["EventOutcomeIndicator"] == 4,
                           "401")
    assert _requestor(unauthenticated) == "anonymous"
    forbidden = only(lambda r: _code(r) == "110113" and "110132" in _types(r), "403")
    assert _requestor(forbidden) == "phi-viewer"
    assert not [r for r in records if _code(r) == "110113" and "110126" in _types(r)]  # no peer was refused
