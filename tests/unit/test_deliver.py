"""Deliverer with a fake sender (the transport seam): backoff, retry, never dropped."""

import itertools
from collections.abc import Sequence
from pathlib import Path

from node.catalog import Catalog
from node.config import Settings
from node.send.base import DestinationUnreachable, SendReport
from node.send.deliver import Deliverer
from node.spool import Spool


class FlakySender:
    def __init__(self, fail_times: int) -> None:
        self.fail_times = fail_times
        self.calls: list[list[Path]] = []

    def send(self, files: Sequence[Path]) -> SendReport:
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
    [job] = catalog.create_jobs(1, 1, [(series.id, "m", "r", ["pacs"])], 0.0)
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
        def send(self, files: Sequence[Path]) -> SendReport:
            return SendReport(failed={f: "status 0xA700" for f in files})

    d, catalog, now = setup(tmp_path, FlakySender(0))
    d.sender_factory = lambda name: Rejecting()
    assert d.tick() == 0
    [(delivery, _, _)] = catalog.due_deliveries(now[0] + 10)
    assert delivery.state == "pending" and delivery.last_error == "status 0xA700" and delivery.attempts == 1
