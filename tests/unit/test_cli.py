"""``dicom-node`` on a real catalog: status (tables and --json), studies, study, jobs, retry, help,
version, exit codes and shell completion. No patient attribute ever reaches the output."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from node.catalog import Catalog, JobSpec, ResultFile
from node.catalog_ops import JobTimings
from node.cli import main
from node.config import load_settings
from node.policy import JobPolicy
from node.receive.scp import STATUS_SUCCESS, Receiver
from node.schema import JobState
from node.spool import Spool
from testkit.harness import VENV_BIN
from tests.dsfactory import ct_slice, encode

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY = "1.2.826.0.1.3680043.99.41"
PHI = ("Cli^Patient", "CLI-PID-0815", "19500101")
NOW = 1_800_000_000.0


@dataclass
class Seeded:
    config: Path
    catalog: Catalog
    study_id: int
    done_job: int
    failed_job: int
    failing_delivery: int


def _slice(study: str, series: str, sop: str, z: float, patient: tuple[str, str, str] = PHI) -> bytes:
    ds = ct_slice(study, series, sop, z=z)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient
    return encode(ds)


def seed(tmp_path: Path, t0: float = NOW, **sections: object) -> Seeded:
    """Study 1 (received at ``t0``): routed, a done job (SEG + SR sent to pacs, pending to web after 3
    failures) and a failed job; study 2: still receiving. ``sections``: more configuration."""
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({
        **sections,
        "node": {"storage_dir": str(tmp_path / "s"), "min_free_mb": 0},
        "destinations": [{"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                         {"name": "web", "type": "dicomweb", "url": "https://pacs.example/dicom-web"},
                         {"name": "spare", "type": "dimse", "ae_title": "SPARE", "host": "127.0.0.1", "port": 105}],
    }))
    settings = load_settings(cfg)
    catalog, spool = Catalog.for_storage(settings.node.storage_dir), Spool(settings.node.storage_dir)
    receiver = Receiver(settings, catalog, spool, lambda: t0)
    for i in range(3):
        uid = f"{STUDY}.1.{i}"
        assert receiver.store(_slice(STUDY, f"{STUDY}.1", uid, float(i)), CT, uid, "SCANNER") == STATUS_SUCCESS
    [study_id] = catalog.mark_quiet_studies_ready(t0 + 1, now=t0 + 30)
    uid = "1.2.826.0.1.3680043.99.42.1.1"
    other = ("Other^Patient", "CLI-PID-4711", "19600101")  # not a prior of study 1
    assert receiver.store(_slice("1.2.826.0.1.3680043.99.42", "1.2.826.0.1.3680043.99.42.1", uid, 0.0, other), CT,
                          uid, "SCANNER") == STATUS_SUCCESS
    [series] = catalog.series_of_study(study_id)
    done, failed = catalog.create_jobs(study_id, 1, [JobSpec(series.id, "ct-hu-segmentation", "ct", ("pacs", "web")),
                                                     JobSpec(series.id, "ct-lung-nodules", "ct", ())], t0 + 31)
    for job in (done, failed):
        catalog.mark_enqueued(job, t0 + 32)
        assert catalog.claim_job(job, t0 + 33, worker="gpu-host:77", policy=JobPolicy()) is not None
    catalog.record_results(done, [ResultFile("SEG", "2.25.7001", "1.2.840.10008.5.1.4.1.1.66.4", "results/a/seg.dcm"),
                                  ResultFile("SR", "2.25.7002", "1.2.840.10008.5.1.4.1.1.88.34", "results/a/sr.dcm")],
                           ["pacs", "web"], t0 + 40)
    catalog.record_job_timings(done, JobTimings(1.5, 3.0, 2.0, "1.1.0"), t0 + 40)
    catalog.finish_job(failed, JobState.FAILED, t0 + 41, error="RuntimeError: no lungs found in series #1")
    deliveries = {(d.destination, r.kind): d.id for d, r, _ in catalog.due_deliveries(float("inf"))}
    for kind in ("SEG", "SR"):
        catalog.delivery_sent(deliveries[("pacs", kind)], t0 + 45)
    for attempt in range(3):
        catalog.delivery_failed(deliveries[("web", "SEG")], "web unreachable (ConnectError)", t0 + 3600,
                                now=t0 + 45 + attempt)
    catalog.set_destination_paused("spare", True, t0 + 50)
    return Seeded(cfg, catalog, study_id, done, failed, deliveries[("web", "SEG")])


@pytest.fixture
def seeded(tmp_path: Path) -> Seeded:
    return seed(tmp_path)


def _run(capsys: pytest.CaptureFixture[str], *argv: str, rc: int = 0) -> str:
    assert main(list(argv)) == rc
    out = capsys.readouterr()
    for value in PHI:
        assert value not in out.out and value not in out.err
    return out.out


def test_status_json_keeps_the_counts_and_adds_destinations_disk_and_failures(
        seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads(_run(capsys, "status", "--json", "-c", str(seeded.config)))
    counts = seeded.catalog.counts()
    assert {k: data[k] for k in counts} == counts  # what scripts parsed before the tables
    assert data["jobs"] == {"done": 1, "failed": 1} and data["instances"] == {"total": 4}
    assert data["deliveries_by_destination"] == {"pacs": {"sent": 2}, "web": {"pending": 2}}
    assert data["paused_destinations"] == ["spare"]
    disk = data["disk"]
    assert 0 < disk["used"] < disk["total"] and disk["high_watermark_percent"] == 90
    assert disk["areas"]["instances"] == sum(p.stat().st_size for p in (seeded.config.parent / "s" / "instances")
                                             .rglob("*.dcm"))
    assert "failed_jobs" not in data

    data = json.loads(_run(capsys, "status", "--failed", "--json", "-c", str(seeded.config)))
    [job] = data["failed_jobs"]
    assert job["id"] == seeded.failed_job and job["model"] == "ct-lung-nodules" and "no lungs" in job["error"]
    [delivery] = data["failing_deliveries"]
    assert delivery["id"] == seeded.failing_delivery and delivery["attempts"] == 3
    assert delivery["destination"] == "web" and "unreachable" in delivery["last_error"]


def test_status_tables(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    text = _run(capsys, "status", "--failed", "-c", str(seeded.config))
    lines = text.splitlines()

    def row(first: str, *having: str) -> list[str]:
        return next(line.split() for line in lines if line.split()[:1] == [first] and set(having) <= set(line.split()))

    assert row("routed") == ["routed", "1"] and row("receiving") == ["receiving", "1"]
    assert row("done") == ["done", "1"] and row("failed") == ["failed", "1"]
    assert row("destination") == ["destination", "pending", "sent", "paused"]
    assert row("pacs") == ["pacs", "0", "2"] and row("web") == ["web", "2", "0"] and row("spare")[-1] == "paused"
    assert "disk:" in text and "by area: instances" in text
    assert row(f"#{seeded.failed_job}", "ct-lung-nodules")[2:4] == ["ct-lung-nodules", "1"] and "no lungs found" in text
    assert row(f"#{seeded.failing_delivery}", "web")[1:5] == [f"#{seeded.study_id}", "SEG", "web", "3"]


def test_studies_study_and_jobs(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(seeded.config)
    lines = _run(capsys, "studies", "-c", cfg).splitlines()
    assert lines[0].split()[:4] == ["id", "state", "stage", "series"]
    assert lines[1].split()[:3] == [str(seeded.study_id + 1), "receiving", "receiving"]
    assert lines[2].split()[:3] == [str(seeded.study_id), "routed", "processed"]  # a delivery still pending
    assert lines[-1] == "2 of 2 shown (from 1)"
    assert _run(capsys, "studies", "--limit", "1", "-c", cfg).splitlines()[-1] == \
        "1 of 2 shown (from 1); next page: --offset 1"
    page = json.loads(_run(capsys, "studies", "--state", "routed", "--json", "-c", cfg))
    assert page["total"] == 1 and page["items"][0]["counts"]["jobs"] == {"done": 1, "failed": 1}
    assert _run(capsys, "studies", "--state", "prior", "-c", cfg).strip() == "0 of 0 shown (from 0)"
    assert [s["id"] for s in json.loads(_run(capsys, "studies", "--model", "ct-lung-nodules", "--json", "-c", cfg))[
        "items"]] == [seeded.study_id]
    assert json.loads(_run(capsys, "studies", "--destination", "spare", "--json", "-c", cfg))["total"] == 0
    assert json.loads(_run(capsys, "studies", "--since", "2027-01-15T08:00:00+00:00", "--until", "2027-01-16",
                           "--json", "-c", cfg))["total"] == 2
    with pytest.raises(SystemExit):
        main(["studies", "--since", "last tuesday", "-c", cfg])
    assert "--since" in capsys.readouterr().err

    text = _run(capsys, "study", str(seeded.study_id), "-c", cfg)
    assert "timeline: received +0 ms → last instance +0 ms → ready +30.0 s → routed" in text
    assert "Modality=CT" in text and "gpu-host:77" in text and "1.5 s / 3.0 s / 2.0 s" in text
    detail = json.loads(_run(capsys, "study", str(seeded.study_id), "--json", "-c", cfg))
    assert [j["id"] for j in detail["jobs"]] == [seeded.done_job, seeded.failed_job] and len(detail["deliveries"]) == 4
    assert main(["study", "999", "-c", cfg]) == 1

    lines = _run(capsys, "jobs", "--state", "failed", "-c", cfg).splitlines()
    assert lines[1].split()[:5] == [str(seeded.failed_job), f"#{seeded.study_id}", "#1", "ct-lung-nodules", "failed"]
    assert lines[-1] == "1 of 1 shown (from 1)"
    page = json.loads(_run(capsys, "jobs", "--model", "ct-hu-segmentation", "--json", "-c", cfg))
    assert [j["id"] for j in page["items"]] == [seeded.done_job] and page["items"][0]["times"]["infer_seconds"] == 3.0
    with pytest.raises(SystemExit) as exc:
        main(["jobs", "--state", "exploded", "-c", cfg])
    assert exc.value.code == 2


def test_retry_jobs_and_deliveries(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(seeded.config)
    for bad in ([], ["--all-failed", "--job", "1"]):
        with pytest.raises(SystemExit) as exc:
            main(["retry", *bad, "-c", cfg])
        assert exc.value.code == 2
    assert "exactly one of --job, --study, --all-failed, --delivery" in capsys.readouterr().err
    assert _run(capsys, "retry", "--job", str(seeded.failed_job), "-c", cfg).startswith("1 job(s) queued again")
    assert seeded.catalog.counts()["jobs"] == {"done": 1, "queued": 1}
    _run(capsys, "retry", "--all-failed", "-c", cfg, rc=1)  # nothing failed any more
    _run(capsys, "retry", "--delivery", str(seeded.failing_delivery), "-c", cfg)
    assert seeded.catalog.get_delivery(seeded.failing_delivery).next_attempt_at < NOW + 3600  # type: ignore[union-attr]


def test_configuration_errors_exit_2_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "-c", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith(f"dicom-node: cannot read configuration {tmp_path / 'missing.yaml'}")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"node": {"storage_dir": str(tmp_path), "port": 0}}))
    assert main(["jobs", "-c", str(bad)]) == 2
    assert "node.port" in capsys.readouterr().err


def test_config_from_the_environment(seeded: Seeded, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_NODE_CONFIG", str(seeded.config))
    assert json.loads(_run(capsys, "status", "--json"))["jobs"] == {"done": 1, "failed": 1}
    monkeypatch.delenv("DICOM_NODE_CONFIG")
    with pytest.raises(SystemExit) as exc:
        main(["status"])
    assert exc.value.code == 2 and "--config" in capsys.readouterr().err


def test_help_groups_every_command_and_version(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for panel in ("Run the node", "Look at the node", "Act on it", "Administration"):
        assert panel in text
    for command in ("run", "worker", "check-config", "status", "studies", "study", "jobs", "retry", "send", "push",
                    "token", "audit", "models"):
        assert f"│ {command} " in text, command
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("dicom-node ")


def test_shell_completion_offline() -> None:
    """The installed command prints its bash completion script and completes command names (the
    protocol a shell uses after ``dicom-node --install-completion``)."""
    exe = str(VENV_BIN / "dicom-node")
    script = subprocess.run([exe, "--show-completion", "bash"], capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and "_DICOM_NODE_COMPLETE=complete_bash" in script.stdout
    done = subprocess.run([exe], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "_DICOM_NODE_COMPLETE": "complete_bash",
                               "COMP_WORDS": "dicom-node stu", "COMP_CWORD": "1"})
    assert done.stdout.split() == ["studies", "study"], done
