"""The purge against a real SQLite catalog and spool: rows and files go together, nothing pending is
touched, an instances purge keeps the study's history, a crash after the commit is finished by the
journal, and an instance arriving during a purge is never lost."""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from node.catalog import Catalog
from node.dicomweb.search import stored_instances
from node.lifecycle import purge as purge_mod
from node.lifecycle.eligibility import DAY, Reason, Scope
from node.lifecycle.guard import NodeLock, NodeRunningError, StudyGuard, node_running, require_node_stopped
from node.lifecycle.purge import execute_purge, finish_journal, plan_purge, purge_study
from node.lifecycle.usage import disk_usage
from node.receive.scp import STATUS_SUCCESS
from node.route import Router
from node.schema import Delivery, Job, JobState, PurgeJournal, PurgeMark, Result, Series, Study, StudyState
from tests.dsfactory import ct_slice, encode
from tests.unit.lifecycle_helpers import (
    CT,
    add_study,
    catalog_paths,
    files_on_disk,
    inconsistencies,
    node_parts,
    study_uid,
)


def _count(catalog: Catalog, table: type) -> int:
    with catalog.reading() as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)


def _study_ids(catalog: Catalog) -> set[int]:
    with catalog.reading() as s:
        return set(s.scalars(select(Study.id)))


def test_retention_purges_rows_and_files_together(tmp_path: Path, catalog_url: str | None) -> None:
    settings, catalog, spool, receiver, clock = node_parts(tmp_path, catalog_url=catalog_url, retention={
        "results_days": 7, "failed_days": 7, "unrouted_days": 7})
    old = [add_study(receiver, n, outcome=o, now=0.0, clock=clock)
           for n, o in enumerate(["delivered", "failed", "unrouted"], start=1)]
    kept = {add_study(receiver, 4, outcome="pending", now=0.0, clock=clock),      # delivery pending
            add_study(receiver, 5, outcome="queued", now=0.0, clock=clock),       # job under way
            add_study(receiver, 6, outcome="receiving", now=0.0, clock=clock),
            add_study(receiver, 7, outcome="delivered", now=5 * DAY, clock=clock)}  # not due yet
    before = files_on_disk(tmp_path)
    plan = plan_purge(settings, catalog, 8 * DAY, watermarks=False)
    assert [(i.study_id, i.scope) for i in plan.items] == [(s, Scope.STUDY) for s in old]
    assert {i.reason for i in plan.items} == {Reason.RESULTS_DAYS, Reason.FAILED_DAYS, Reason.UNROUTED_DAYS}
    assert plan.files == 3 * 3 + 2 and plan.rows > plan.files
    assert plan.kept == {"deliveries pending": 1, "jobs under way": 1, "receiving": 1, "retention not due yet": 1}
    assert files_on_disk(tmp_path) == before  # a plan changes nothing
    outcome = execute_purge(settings, catalog, spool, plan, 8 * DAY)
    assert [i.study_id for i in outcome.purged] == old and not outcome.skipped
    assert (outcome.files, outcome.bytes, outcome.rows) == (plan.files, plan.bytes, plan.rows)  # plan = what went
    assert _study_ids(catalog) == kept
    assert inconsistencies(catalog, tmp_path) == (set(), set())
    assert not any((tmp_path / "instances" / study_uid(n)).exists() for n in (1, 2, 3))  # directories too
    assert not (tmp_path / "results" / study_uid(1)).exists()
    assert _count(catalog, Delivery) == 4 and _count(catalog, PurgeJournal) == 0  # studies 4 and 7: two each
    assert plan_purge(settings, catalog, 8 * DAY, watermarks=False).items == ()
    catalog.close()


def test_instances_purge_keeps_the_history(tmp_path: Path, catalog_url: str | None) -> None:
    settings, catalog, spool, receiver, clock = node_parts(tmp_path, catalog_url=catalog_url,
                                                           retention={"instances_days": 1})
    sid = add_study(receiver, 1, now=0.0, clock=clock)
    plan = plan_purge(settings, catalog, 2 * DAY, watermarks=False)
    assert [(i.scope, i.files) for i in plan.items] == [(Scope.INSTANCES, 3)]
    execute_purge(settings, catalog, spool, plan, 2 * DAY)
    assert inconsistencies(catalog, tmp_path) == (set(), set())
    assert not (tmp_path / "instances" / study_uid(1)).exists()
    assert (tmp_path / "results" / study_uid(1)).is_dir()  # results stay, served and delivered
    with catalog.reading() as s:
        study = s.get_one(Study, sid)
        assert study.instance_count == 0 and s.get_one(PurgeMark, sid).files == 3
        assert _count(catalog, Job) == 1 and _count(catalog, Result) == 2
    assert [h.sop_uid for h in stored_instances(catalog, study_uid(1))] == [f"{study_uid(1)}.9.1"]
    assert plan_purge(settings, catalog, 3 * DAY, watermarks=False).items == ()  # nothing more is due
    # a late instance re-opens it: routing takes only the series that has instances again
    clock[0] = 3 * DAY
    ds = ct_slice(study_uid(1), f"{study_uid(1)}.2", f"{study_uid(1)}.2.1")
    ds.PatientID = "P-1"
    assert receiver.store(encode(ds), CT, f"{study_uid(1)}.2.1", "SCANNER") == STATUS_SUCCESS
    with catalog.session() as s:
        s.get_one(Study, sid).state = StudyState.READY
    Router(catalog, settings.rules, lambda: 3 * DAY).route_ready()
    with catalog.reading() as s:
        new = s.execute(select(Series.series_uid, Job.generation).join(Job, Job.series_id == Series.id)
                        .where(Job.generation == 2)).all()
    assert [tuple(r) for r in new] == [(f"{study_uid(1)}.2", 2)]
    catalog.close()


def test_watermarks_take_the_oldest_settled_whole(tmp_path: Path) -> None:
    settings, catalog, spool, receiver, clock = node_parts(tmp_path, high_watermark_percent=80,
                                                           low_watermark_percent=60)
    ids = [add_study(receiver, n, now=float(100 - n), clock=clock) for n in range(1, 5)]  # 4 is the oldest
    add_study(receiver, 9, outcome="pending", now=0.0, clock=clock)
    usage = disk_usage(settings, catalog)
    assert plan_purge(settings, catalog, 200.0, usage=usage).items == ()  # nothing by retention, disk not full
    full = replace(usage, used=usage.total, free=0, used_percent=100.0)
    everything = plan_purge(settings, catalog, 200.0, usage=full)
    assert [i.study_id for i in everything.items] == ids[::-1] and everything.exhausted  # never the pending one
    # pretend the disk is 85% full and that 2.5 studies' worth of bytes bring it below 60%
    total = int(everything.items[0].bytes * 2.5 / 0.25)
    fake = replace(usage, total=total, used=int(total * 0.85), free=int(total * 0.15), used_percent=85.0)
    plan = plan_purge(settings, catalog, 200.0, usage=fake)
    assert [i.study_id for i in plan.items] == [ids[3], ids[2], ids[1]]
    assert {(i.scope, i.reason) for i in plan.items} == {(Scope.STUDY, Reason.WATERMARK)}
    assert plan.target_bytes == int(total * 0.85) - int(total * 0.60) and not plan.exhausted
    execute_purge(settings, catalog, spool, plan, 200.0)
    assert _study_ids(catalog) == {ids[0], max(_study_ids(catalog))}
    assert inconsistencies(catalog, tmp_path) == (set(), set())


def test_a_study_no_longer_eligible_is_skipped(tmp_path: Path) -> None:
    settings, catalog, spool, receiver, clock = node_parts(tmp_path, retention={"results_days": 1})
    sid = add_study(receiver, 1, now=0.0, clock=clock)
    plan = plan_purge(settings, catalog, 2 * DAY, watermarks=False)
    with catalog.session() as s:  # an operator reruns it between the plan and the purge
        s.execute(update(Job).values(state=JobState.QUEUED))
    outcome = execute_purge(settings, catalog, spool, plan, 2 * DAY)
    assert outcome.purged == [] and outcome.skipped == {sid: "jobs under way"}
    assert len(files_on_disk(tmp_path)) == 5 and inconsistencies(catalog, tmp_path) == (set(), set())


def test_a_crash_after_the_commit_is_finished_by_the_journal(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    settings, catalog, spool, receiver, clock = node_parts(tmp_path, retention={"results_days": 1})
    add_study(receiver, 1, now=0.0, clock=clock)
    keep = add_study(receiver, 2, now=5 * DAY, clock=clock)
    plan = plan_purge(settings, catalog, 2 * DAY, watermarks=False)

    def crash(*_args: object) -> int:
        raise SystemExit("killed")

    monkeypatch.setattr(purge_mod, "remove_files", crash)
    with pytest.raises(SystemExit):
        execute_purge(settings, catalog, spool, plan, 2 * DAY)
    missing_rows, orphans = inconsistencies(catalog, tmp_path)
    assert missing_rows == set() and len(orphans) == 5  # rows gone, files listed in the journal
    assert _count(catalog, PurgeJournal) == 1
    monkeypatch.undo()
    assert finish_journal(catalog, tmp_path) == (1, 5)
    assert inconsistencies(catalog, tmp_path) == (set(), set()) and _study_ids(catalog) == {keep}
    assert _count(catalog, PurgeJournal) == 0


def test_an_instance_arriving_during_a_purge_is_kept(tmp_path: Path) -> None:
    settings, catalog, _spool, receiver, clock = node_parts(tmp_path, retention={"results_days": 1})
    add_study(receiver, 1, now=0.0, clock=clock)
    guard, entered = StudyGuard(), threading.Event()

    def receiving(uid: str) -> AbstractContextManager[None]:
        entered.set()
        return guard.receiving(uid)

    receiver.study_guard = receiving
    [item] = plan_purge(settings, catalog, 2 * DAY, watermarks=False).items
    uid = study_uid(1)
    again = ct_slice(uid, f"{uid}.1", f"{uid}.1.1")  # the PACS sends an instance of it again
    again.PatientID = "P-1"
    status: list[int] = []
    with guard.purging(uid):
        t = threading.Thread(target=lambda: status.append(receiver.store(encode(again), CT, f"{uid}.1.1", "S")))
        t.start()
        assert entered.wait(10)
        assert purge_study(settings, catalog, item, 2 * DAY) == (5, item.bytes, item.rows)
        assert t.is_alive() and not status  # held back until the purge is over
    t.join(10)
    assert status == [STATUS_SUCCESS]
    assert f"instances/{uid}/{uid}.1/{uid}.1.1.dcm" in files_on_disk(tmp_path)
    assert catalog_paths(catalog) == {f"instances/{uid}/{uid}.1/{uid}.1.1.dcm"}
    with catalog.reading() as s:  # a new study (SQLite may give it the id again), receiving
        [study] = s.scalars(select(Study)).all()
        assert (study.state, study.instance_count, study.routed_at) == (StudyState.RECEIVING, 1, None)


def test_node_lock(tmp_path: Path) -> None:
    assert not node_running(tmp_path)
    lock = NodeLock(tmp_path)
    assert lock.acquire()
    try:
        assert node_running(tmp_path)
        assert not NodeLock(tmp_path).acquire()
        with pytest.raises(NodeRunningError, match="POST /api/v1/storage/purge"):
            require_node_stopped(tmp_path)
        settings, catalog, spool, _receiver, _clock = node_parts(tmp_path)
        with pytest.raises(NodeRunningError):  # the CLI's purge: no guard, the node's lock is held
            execute_purge(settings, catalog, spool, plan_purge(settings, catalog, 0.0), 0.0)
    finally:
        lock.release()
    assert not node_running(tmp_path)
    require_node_stopped(tmp_path)


def test_usage_by_area(tmp_path: Path) -> None:
    settings, catalog, _spool, receiver, clock = node_parts(tmp_path)
    add_study(receiver, 1, now=0.0, clock=clock)
    (tmp_path / "tmp" / "x.part").write_bytes(b"x" * 1000)
    u = disk_usage(settings, catalog)
    sizes = {p: (tmp_path / p).stat().st_size for p in files_on_disk(tmp_path)}
    assert u.areas["instances"] == sum(n for p, n in sizes.items() if p.startswith("instances/"))
    assert u.areas["results"] == sum(n for p, n in sizes.items() if p.startswith("results/"))
    assert u.areas["tmp"] == 1000 and u.areas["catalog"] > 0
    assert 0 < u.used <= u.total and 0 <= u.used_percent <= 100
    with catalog.reading() as s:
        assert s.scalar(select(func.count()).select_from(Series)) == 2
