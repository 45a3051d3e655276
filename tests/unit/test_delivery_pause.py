"""A paused destination (persisted in the catalog) holds its deliveries in the delivery loop; on
resume they are sent at the next pass, backoff or not. Other destinations are not held."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from node.catalog import Catalog, JobSpec, ResultFile
from node.config import parse_settings
from node.send.base import SendReport
from node.send.deliver import Deliverer
from node.spool import Spool


class Recording:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Path]]] = []

    def sender(self, name: str) -> Recording.Sender:
        return Recording.Sender(self, name)

    class Sender:
        def __init__(self, outer: Recording, name: str) -> None:
            self.outer, self.name = outer, name

        def send(self, files: Sequence[Path], variants: Mapping[Path, str] | None = None) -> SendReport:
            self.outer.calls.append((self.name, list(files)))
            return SendReport(sent=list(files))


def test_paused_destination_holds_deliveries_until_resumed(tmp_path: Path) -> None:
    settings = parse_settings({
        "node": {"storage_dir": str(tmp_path)},
        "destinations": [{"name": n, "type": "dimse", "ae_title": "P", "host": "127.0.0.1", "port": 1}
                         for n in ("pacs", "archive")]})
    catalog = Catalog.for_storage(tmp_path)
    catalog.record_instance(study_uid="1.2", series_uid="1.2.3", sop_instance_uid="1.2.3.4",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                            path="x", size=1, series_attributes={}, now=0.0)
    catalog.mark_quiet_studies_ready(1.0)
    [series] = catalog.series_of_study(1)
    [job] = catalog.create_jobs(1, 1, [JobSpec(series.id, "m", "r", ("pacs", "archive"))], 0.0)
    catalog.record_results(job, [ResultFile("SEG", "1.9", "1.2.840.10008.5.1.4.1.1.66.4", "r/1.dcm")],
                           ["pacs", "archive"], 0.0)
    now = [10.0]
    senders = Recording()
    d = Deliverer(settings, catalog, Spool(tmp_path), lambda: now[0], sender_factory=senders.sender)

    catalog.set_destination_paused("pacs", True, 5.0)
    for _ in range(3):
        d.tick()
        now[0] += 100
    assert [name for name, _ in senders.calls] == ["archive"]
    assert catalog.counts()["deliveries"] == {"pending": 1, "sent": 1}
    assert Catalog.for_storage(tmp_path).paused_destinations() == {"pacs"}  # persisted

    catalog.set_destination_paused("pacs", False, now[0])
    assert d.tick() == 1
    assert [name for name, _ in senders.calls] == ["archive", "pacs"]
    assert catalog.counts()["deliveries"] == {"sent": 2}
