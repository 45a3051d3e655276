"""Deliverer with a fake sender (the transport seam): backoff, retry, never dropped."""

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

from models.errors import DestinationUnreachable
from node.catalog import Catalog, Job, JobSpec, ResultFile
from node.config import Settings
from node.send.base import SendReport
from node.send.deliver import Deliverer
from node.spool import Spool


class FlakySender:
    def __init__(self, fail_times: int) -> None:
        self.fail_times = fail_times
        self.calls: list[list[Path]] = []

    def send(self, files: Sequence[Path], variants: Mapping[Path, str] | None = None) -> SendReport:
        self.calls.append(list(files))
        if len(self.calls) <= self.fail_times:
            raise DestinationUnreachable("connection refused")
        return SendReport(sent=list(files))


def setup(tmp_path: Path, sender: FlakySender) -> tuple[Deliverer, Catalog, list[float]]:
    settings = Settings.model_validate({
        "node": {"storage_dir": str(tmp_path)},
        "send": {"retry_initial_seconds": 10, "retry_max_seconds": 40},
        "destinations": [{"name": "pacs", "type": "dimse", "ae_title": "P", "host": "127.0.0.1", "port": 1}],
    })
    catalog = Catalog.for_storage(tmp_path)
    now = [0.0]
    catalog.record_instance(study_uid="1.2", series_uid="1.2.3", sop_instance_uid="1.2.3.4",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                            path="x", size=1, series_attributes={}, now=0.0)
    catalog.mark_quiet_studies_ready(1.0)
    [series] = catalog.series_of_study(1)
    [job] = catalog.create_jobs(1, 1, [JobSpec(series.id, "m", "r", ("pacs",))], 0.0)
    catalog.record_results(job, [("SEG", "1.9", "1.2.840.10008.5.1.4.1.1.66.4", "results/1.2/1.9.dcm")],
                           ["pacs"], 0.0)
    d = Deliverer(settings, catalog, Spool(tmp_path), clock=lambda: now[0], sender_factory=lambda name: sender)
    return d, catalog, now


def test_retries_with_capped_backoff_until_sent(tmp_path: Path) -> None:
    sender = FlakySender(fail_times=4)
    d, catalog, now = setup(tmp_path, sender)
    attempts_at = []
    while catalog.counts()["deliveries"].get("sent", 0) == 0 and now[0] < 1000:
        if d.tick() or len(sender.calls) > len(attempts_at):
            attempts_at.append(now[0])
        now[0] += 1
    assert catalog.counts()["deliveries"] == {"sent": 1}
    assert len(sender.calls) == 5
    gaps = [b - a for a, b in itertools.pairwise(attempts_at)]
    assert gaps == [10, 20, 40, 40]  # doubling, capped at retry_max_seconds
    assert sender.calls[0][0] == tmp_path / "results/1.2/1.9.dcm"


def test_partial_failure_keeps_failed_pending(tmp_path: Path) -> None:
    class Rejecting:
        def send(self, files: Sequence[Path], variants: Mapping[Path, str] | None = None) -> SendReport:
            return SendReport(failed={f: "status 0xA700" for f in files})

    d, catalog, now = setup(tmp_path, FlakySender(0))
    d.sender_factory = lambda name: Rejecting()
    assert d.tick() == 0
    [(delivery, _, _)] = catalog.due_deliveries(now[0] + 10)
    assert delivery.state == "pending" and delivery.last_error == "status 0xA700" and delivery.attempts == 1


def test_variants_reach_the_sender_and_the_other_set_is_not_needed(tmp_path: Path) -> None:
    """A destination that takes the LABELMAP set: the BINARY set is marked not-needed, not retried."""
    seen: list[dict[Path, str]] = []

    class LabelmapCapable:
        def send(self, files: Sequence[Path], variants: Mapping[Path, str] | None = None) -> SendReport:
            marks = dict(variants or {})
            seen.append(marks)
            return SendReport(sent=[f for f in files if marks.get(f) != "binary"],
                              not_needed=[f for f in files if marks.get(f) == "binary"])

    d, catalog, now = setup(tmp_path, FlakySender(0))
    catalog.record_results(1, [  # job #1 of setup()
        ResultFile("SEG", "1.10", "1.2.840.10008.5.1.4.1.1.66.7", "results/1.2/1.10.dcm", "labelmap"),
        ResultFile("SEG", "1.11", "1.2.840.10008.5.1.4.1.1.66.4", "results/1.2/1.11.dcm", "binary"),
    ], ["pacs"], 0.0)
    d.sender_factory = lambda name: LabelmapCapable()
    assert d.tick() == 2  # the plain SEG of setup() and the labelmap one
    assert seen[0][tmp_path / "results/1.2/1.10.dcm"] == "labelmap"
    assert seen[0][tmp_path / "results/1.2/1.11.dcm"] == "binary"
    assert tmp_path / "results/1.2/1.9.dcm" not in seen[0]
    assert catalog.counts()["deliveries"] == {"sent": 2, "not-needed": 1}
    now[0] += 1000
    assert d.tick() == 0 and len(seen) == 1  # nothing left to send


def test_rerun_reopens_not_needed_deliveries(tmp_path: Path) -> None:
    """A rerun (another job writing the same UID) may change what the destination needs."""
    _d, catalog, _now = setup(tmp_path, FlakySender(0))
    files = [ResultFile("SEG", "1.11", "1.2.840.10008.5.1.4.1.1.66.4", "results/1.2/1.11.dcm", "binary")]
    catalog.record_results(1, files, ["pacs"], 0.0)
    [(delivery, result, _)] = [x for x in catalog.due_deliveries(0.0) if x[1].sop_instance_uid == "1.11"]
    assert result.variant == "binary"
    catalog.delivery_not_needed(delivery.id, 0.0)
    assert catalog.counts()["deliveries"] == {"pending": 1, "not-needed": 1}
    with catalog.session() as s:  # a later generation's job of the same series and model
        job = Job(study_id=1, series_id=1, generation=2, model="m", rule="r", destinations='["pacs"]',
                  created_at=1.0, updated_at=1.0)
        s.add(job)
        s.flush()
        rerun = job.id
    catalog.record_results(rerun, files, ["pacs"], 1.0)
    assert catalog.counts()["deliveries"] == {"pending": 2}
