"""Early study completion (issue 15): the pure readiness rules, and the tracker with the assembler on a real
catalog (SQLite and PostgreSQL), driven by a fake clock."""

from __future__ import annotations

import logging

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from node.assemble import Assembler
from node.catalog import Catalog
from node.completion import (
    ANNOUNCED_SIZE,
    WHOLE_STUDY,
    Announced,
    CompletionTracker,
    SeriesFacts,
    StudyFacts,
    announced_by,
    early_reason,
    series_size,
)
from node.receive.scp import InstancesReceived, StoredInstance
from node.schema import StudyState

SETTLE = 2.0
QUIET = 30.0
WHOLE = frozenset({"PACS"})
STUDY = "1.2.3"
CT = "1.2.840.10008.5.1.4.1.1.2"


def series(received: int, *iia: int | None, frames: tuple[int, ...] = (1,)) -> SeriesFacts:
    return SeriesFacts(received, frozenset(iia), frozenset(frames))


def facts(*of: SeriesFacts, stored: int | None = None, ended: int | None = None, aborted: bool = False,
          senders: tuple[tuple[str, str], ...] = (("dimse", "SCANNER"),), last: float = 100.0) -> StudyFacts:
    total = sum(s.received for s in of)
    return StudyFacts(tuple(of), total if stored is None else stored, total if ended is None else ended, aborted,
                      frozenset(senders), last)


# ---- the pure rules ------------------------------------------------------------------------------
def test_announced_size_complete_after_settle() -> None:
    f = facts(series(3, 3), series(2, 2))
    assert early_reason(f, 100.0 + SETTLE - 0.1, SETTLE, WHOLE) is None  # a second association may follow
    assert early_reason(f, 100.0 + SETTLE, SETTLE, WHOLE) == ANNOUNCED_SIZE


def test_announced_size_not_reached_or_exceeded() -> None:
    assert early_reason(facts(series(2, 3)), 200.0, SETTLE, WHOLE) is None
    assert early_reason(facts(series(4, 3)), 200.0, SETTLE, WHOLE) is None  # another acquisition in the series


def test_mismatched_or_missing_images_in_acquisition() -> None:
    assert series_size(series(3, 3, 4)) is None
    assert early_reason(facts(series(3, 3, 4)), 200.0, SETTLE, WHOLE) is None
    assert series_size(series(3, 3, None)) is None  # one instance without it
    assert early_reason(facts(series(3, 3, None)), 200.0, SETTLE, WHOLE) is None
    # one series without a size: it cannot be told from a partial one
    assert early_reason(facts(series(3, 3), series(1, None)), 200.0, SETTLE, WHOLE) is None


def test_single_multiframe_instance_is_its_series() -> None:
    assert series_size(series(1, None, frames=(40,))) == 1
    assert series_size(series(1, 40, frames=(40,))) == 1
    assert series_size(series(2, None, frames=(40,))) is None  # a second instance: no longer announced
    assert series_size(series(1, 7, frames=(40,))) is None
    assert early_reason(facts(series(1, None, frames=(40,))), 200.0, SETTLE, WHOLE) == ANNOUNCED_SIZE


def test_open_association_holds_it_back() -> None:
    assert early_reason(facts(series(3, 3), ended=2), 200.0, SETTLE, WHOLE) is None
    assert early_reason(facts(series(3, 3), ended=0, senders=()), 200.0, SETTLE, WHOLE) is None


def test_aborted_association_never_completes_early() -> None:
    assert early_reason(facts(series(3, 3), aborted=True), 200.0, SETTLE, WHOLE) is None
    assert early_reason(facts(series(3, None), aborted=True, senders=(("dimse", "PACS"),)), 200.0, SETTLE,
                        WHOLE) is None


def test_whole_study_peer() -> None:
    pacs = (("dimse", "PACS"),)
    assert early_reason(facts(series(5, None), senders=pacs), 100.0 + SETTLE, SETTLE, WHOLE) == WHOLE_STUDY
    assert early_reason(facts(series(5, None), senders=pacs), 101.0, SETTLE, WHOLE) is None
    assert early_reason(facts(series(5, None)), 200.0, SETTLE, WHOLE) is None  # SCANNER is no such peer
    mixed = (("dimse", "PACS"), ("dimse", "SCANNER"))
    assert early_reason(facts(series(5, None), senders=mixed), 200.0, SETTLE, WHOLE) is None
    assert early_reason(facts(series(5, None), senders=(("stow", "PACS"),)), 200.0, SETTLE, WHOLE) is None


def test_nothing_stored_is_not_ready() -> None:
    assert early_reason(facts(), 200.0, SETTLE, WHOLE) is None


def test_announced_by_reads_the_instance() -> None:
    ds = Dataset()
    assert announced_by(ds) == Announced(None, 1)
    ds.ImagesInAcquisition = 120
    ds.NumberOfFrames = 1
    assert announced_by(ds) == Announced(120, 1)
    ds.NumberOfFrames = 40
    assert announced_by(ds) == Announced(120, 40)
    ds.ImagesInAcquisition = 0
    assert announced_by(ds).images_in_acquisition is None
    bad = Dataset()  # as read from a file: a malformed value counts as absent, never refuses the instance
    bad[0x00201002] = RawDataElement(Tag(0x00201002), "IS", 4, b"12x ", 0, True, True)
    with pytest.warns(UserWarning, match="Invalid value for VR IS"):
        assert announced_by(bad).images_in_acquisition is None


# ---- the tracker and the assembler on a real catalog ------------------------------------------------
class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t



class Node:
    """The catalog, the tracker and the assembler as the node service wires them (without sockets)."""

    def __init__(self, catalog: Catalog) -> None:
        self.clock = FakeClock()
        self.catalog = catalog
        self.tracker = CompletionTracker(self.clock, SETTLE, ["PACS"])
        self.assembler = Assembler(catalog, QUIET, self.clock, self.tracker)

    def store(self, sop: str, series_uid: str = "1.2.3.1", iia: int | None = None, *, track: bool = True) -> None:
        recorded = self.catalog.record_instance(
            study_uid=STUDY, series_uid=series_uid, sop_instance_uid=sop, sop_class_uid=CT,
            transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"x/{sop}", size=1,
            series_attributes={"Modality": "CT"}, now=self.clock())
        if track:
            self.tracker.stored(StoredInstance(STUDY, series_uid, sop, recorded.new, Announced(iia, 1)))

    def end(self, n: int, source: str = "SCANNER", *, aborted: bool = False) -> None:
        self.tracker.ended(InstancesReceived("dimse", source, "127.0.0.1", {STUDY: {CT: n}}, 0, aborted=aborted))

    def study(self) -> tuple[StudyState, int]:
        (row,) = [s for state in StudyState for s in self.catalog.studies_in_state(state)]
        return row.state, row.generation


@pytest.fixture
def node(catalog: Catalog) -> Node:
    return Node(catalog)


def test_ready_early_on_announced_size(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(3):
        node.store(f"1.2.3.1.{i}", iia=3)
    node.clock.t += 1
    assert node.assembler.tick() == []  # the association is still open
    node.end(3)
    node.clock.t += SETTLE - 0.1
    assert node.assembler.tick() == []
    node.clock.t += 0.1
    with caplog.at_level(logging.INFO, logger="node.assemble"):
        ready = node.assembler.tick()
    assert len(ready) == 1 and node.study() == (StudyState.READY, 1)
    assert "ready early (announced size)" in caplog.text
    assert len(node.tracker) == 0  # its facts are dropped once it is ready


def test_late_instance_after_early_completion_waits_the_quiet_period(node: Node) -> None:
    for i in range(2):
        node.store(f"1.2.3.1.{i}", iia=2)
    node.end(2)
    node.clock.t += SETTLE
    assert len(node.assembler.tick()) == 1
    node.clock.t += 5
    node.store("1.2.3.1.9", iia=2)  # late: re-opens the routed study as a new generation
    node.end(1)
    assert node.study() == (StudyState.RECEIVING, 2)
    node.clock.t += SETTLE + 1
    assert node.assembler.tick() == []  # the tracker saw 1 instance, the catalog holds 3: quiet period
    node.clock.t += QUIET
    assert len(node.assembler.tick()) == 1
    assert node.study() == (StudyState.READY, 2)


def test_aborted_association_falls_back_to_the_quiet_period(node: Node) -> None:
    for i in range(3):
        node.store(f"1.2.3.1.{i}", iia=3)
    node.end(3, aborted=True)
    node.clock.t += SETTLE + 5
    assert node.assembler.tick() == []
    node.clock.t += QUIET
    assert len(node.assembler.tick()) == 1


def test_second_association_still_open(node: Node) -> None:
    node.store("1.2.3.1.0", iia=1)
    node.end(1)
    node.store("1.2.3.2.0", series_uid="1.2.3.2", iia=2)  # a second association, not ended yet
    node.clock.t += SETTLE + 1
    assert node.assembler.tick() == []
    node.store("1.2.3.2.1", series_uid="1.2.3.2", iia=2)
    node.end(2)
    node.clock.t += SETTLE
    assert len(node.assembler.tick()) == 1


def test_whole_study_peer_without_sizes(node: Node) -> None:
    for i in range(4):
        node.store(f"1.2.3.1.{i}")
    node.end(4, source="PACS")
    node.clock.t += SETTLE
    assert len(node.assembler.tick()) == 1


def test_no_announcement_from_an_ordinary_sender_waits(node: Node) -> None:
    for i in range(4):
        node.store(f"1.2.3.1.{i}")
    node.end(4)
    node.clock.t += SETTLE + 10
    assert node.assembler.tick() == []
    node.clock.t += QUIET
    assert len(node.assembler.tick()) == 1


def test_instances_the_tracker_did_not_see_fall_back(node: Node) -> None:
    node.store("1.2.3.1.0", iia=2, track=False)  # recorded before a restart: the memory lost it
    node.store("1.2.3.1.1", iia=2)
    node.store("1.2.3.1.2", iia=2)
    node.end(2)
    node.clock.t += SETTLE
    assert node.assembler.tick() == []  # 2 seen here, 3 in the catalog
    assert node.study() == (StudyState.RECEIVING, 1)


def test_duplicates_count_for_the_association_not_the_series(node: Node) -> None:
    node.store("1.2.3.1.0", iia=2)
    node.store("1.2.3.1.0", iia=2)  # sent twice
    node.store("1.2.3.1.1", iia=2)
    node.end(3)
    node.clock.t += SETTLE
    assert len(node.assembler.tick()) == 1


def test_idle_facts_are_forgotten(node: Node) -> None:
    node.store("1.2.3.1.0", iia=5)
    node.clock.t += QUIET + SETTLE + 1
    assert len(node.assembler.tick()) == 1  # the quiet period
    assert len(node.tracker) == 0
