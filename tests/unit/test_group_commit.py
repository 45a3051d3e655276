"""Group commit (node/group_commit.py) and the catalog's batch of instance rows built on it."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from node.catalog import Catalog, NewInstance
from node.group_commit import GroupCommit


class Gate:
    """A batch function that records its batches and blocks the first until released."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items: Sequence[str]) -> list[str]:
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.entered.set()
            assert self.release.wait(10)
        if self.fail_on in items:
            raise OSError("disk full")
        return [f"done:{i}" for i in items]


def submit_all(gc: GroupCommit[str, str], gate: Gate, names: list[str]) -> dict[str, str]:
    """The first name leads alone; the others arrive while its batch runs."""
    out: dict[str, str] = {}

    def call(name: str) -> None:
        try:
            out[name] = gc.submit(name)
        except OSError as exc:
            out[name] = f"error:{exc}"

    first = threading.Thread(target=call, args=(names[0],))
    first.start()
    assert gate.entered.wait(10)
    rest = [threading.Thread(target=call, args=(n,)) for n in names[1:]]
    for t in rest:
        t.start()
    while sum(1 for _ in gc._pending) < len(rest):  # all queued behind the running batch
        threading.Event().wait(0.005)
    gate.release.set()
    for t in [first, *rest]:
        t.join(10)
    return out


def test_one_caller_runs_alone() -> None:
    gc: GroupCommit[int, int] = GroupCommit(lambda items: [x * 2 for x in items])
    assert gc.submit(21) == 42
    assert gc.submit(1) == 2


def test_callers_arriving_during_a_commit_share_the_next_batch() -> None:
    gate = Gate()
    out = submit_all(GroupCommit(gate), gate, ["a", "b", "c", "d"])
    assert out == {n: f"done:{n}" for n in "abcd"}
    assert gate.batches[0] == ["a"]
    assert sorted(gate.batches[1]) == ["b", "c", "d"] and len(gate.batches) == 2


def test_a_failed_batch_fails_each_of_its_callers_only() -> None:
    gate = Gate(fail_on="a")
    out = submit_all(GroupCommit(gate), gate, ["a", "b", "c"])
    assert out["a"] == "error:disk full"
    assert out["b"] == "done:b" and out["c"] == "done:c"  # the next batch ran


def test_max_batch_splits() -> None:
    gate = Gate()
    submit_all(GroupCommit(gate, max_batch=2), gate, ["a", "b", "c", "d", "e"])
    assert [len(b) for b in gate.batches] == [1, 2, 2]


def item(sop: str, study: str = "1.2.7", series: str = "1.2.7.1", now: float = 5.0) -> NewInstance:
    return NewInstance(study, series, sop, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", f"x/{sop}", 1,
                       {"Modality": "CT"}, now, None, "", None)


@pytest.mark.parametrize("order", ["duplicate-first", "duplicate-last"])
def test_a_batch_holding_a_duplicate_records_every_item_once(catalog: Catalog, order: str) -> None:
    first = catalog._record_batch([item("1.2.7.1.1")])[0]
    assert first.new and first.study_event == "new"
    batch = [item("1.2.7.1.1", now=6.0), item("1.2.7.1.2", now=6.0), item("1.2.8.1.1", "1.2.8", "1.2.8.1", 6.0)]
    if order == "duplicate-last":
        batch.reverse()
    recorded = {r.sop_instance_uid: rec for r, rec in zip(batch, catalog._record_batch(batch), strict=True)}
    assert not recorded["1.2.7.1.1"].new and recorded["1.2.7.1.1"].study_id == first.study_id
    assert recorded["1.2.7.1.2"].new and recorded["1.2.7.1.2"].study_id == first.study_id
    assert recorded["1.2.8.1.1"].new and recorded["1.2.8.1.1"].study_event == "new"
    assert catalog.counts()["instances"]["total"] == 3
    counts = {s.study_uid: s.instance_count for s in catalog.studies_in_state("receiving")}
    assert counts == {"1.2.7": 2, "1.2.8": 1}  # the rolled-back first try counted nothing
    assert {s.instance_count for s in catalog.series_of_study(first.study_id)} == {2}


def test_one_batch_creates_a_study_then_adds_to_it(catalog: Catalog) -> None:
    """The first item creates study and series by the ORM path, the next ones take the Core path in the
    same transaction: counts must add up (no lost update between the two)."""
    recorded = catalog._record_batch([item(f"1.2.9.1.{i}", "1.2.9", "1.2.9.1") for i in range(1, 5)])
    assert [r.study_event for r in recorded] == ["new", None, None, None]
    study = catalog.studies_in_state("receiving")[0]
    assert study.instance_count == 4
    assert [s.instance_count for s in catalog.series_of_study(study.id)] == [4]
