"""kill -9 during a purge: a real purge in a child process over 40 settled studies (real DICOM files
stored through the Receiver, real SQLite catalog), killed at a few points; after the node's start-up
reconcile no catalog row points at a missing file and no file under instances/ or results/ lacks a
row. Prints the figures (files and rows before, after the kill, after the restart)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from node.catalog import Catalog
from node.config import load_settings
from node.lifecycle.eligibility import DAY
from node.schema import Delivery, Instance, Job, PurgeJournal, Result, Series, Study
from node.service import NodeService
from tests.unit.lifecycle_helpers import add_study, files_on_disk, inconsistencies, node_parts, study_uid

pytestmark = [pytest.mark.timeout(240)]

STUDIES = 40
INSTANCES = 25
CHILD = """
import os, sys, time
_unlink = os.unlink
def slow_unlink(path, *args, **kwargs):  # 1 ms per file: the kill can land inside a study's unlinks
    time.sleep(0.001)
    return _unlink(path, *args, **kwargs)
os.unlink = slow_unlink
from node.catalog import Catalog
from node.config import load_settings
from node.lifecycle.purge import execute_purge, plan_purge
from node.spool import Spool
settings = load_settings(sys.argv[1])
catalog = Catalog.for_storage(settings.node.storage_dir)
plan = plan_purge(settings, catalog, float(sys.argv[2]), watermarks=False)
print(len(plan.items), flush=True)
outcome = execute_purge(settings, catalog, Spool(settings.node.storage_dir), plan, float(sys.argv[2]))
print("done", len(outcome.purged), flush=True)
"""


def _rows(catalog: Catalog) -> int:
    with catalog.reading() as s:
        return sum(int(s.scalar(select(func.count()).select_from(t)) or 0)
                   for t in (Study, Series, Instance, Job, Result, Delivery))


def _journal(catalog: Catalog) -> int:
    with catalog.reading() as s:
        return int(s.scalar(select(func.count()).select_from(PurgeJournal)) or 0)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A storage directory with 40 delivered studies (25 instances and 2 result files each)."""
    storage = tmp_path_factory.mktemp("template") / "storage"
    _settings, catalog, _spool, receiver, clock = node_parts(storage)
    for n in range(1, STUDIES + 1):
        add_study(receiver, n, now=float(n), instances=INSTANCES, clock=clock)
    catalog.engine.dispose()
    return storage


def _mid_unlink(storage: Path, n: int) -> Callable[[], bool]:
    """True while study ``n``'s rows are gone and its files are being unlinked."""
    series = storage / "instances" / study_uid(n) / f"{study_uid(n)}.1"

    def check() -> bool:
        try:
            return 0 < len(os.listdir(series)) < INSTANCES
        except FileNotFoundError:
            return True  # missed the moment: it is gone already; kill now
    return check


def _studies_gone(storage: Path, k: int) -> Callable[[], bool]:
    return lambda: STUDIES - len(os.listdir(storage / "instances")) >= k


KILL_POINTS = {
    "mid-unlink of study 2": lambda storage: _mid_unlink(storage, 2),
    "after 20 studies": lambda storage: _studies_gone(storage, 20),
    "mid-unlink of study 35": lambda storage: _mid_unlink(storage, 35),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_mid_purge_leaves_rows_and_files_consistent(template: Path, tmp_path: Path, point: str) -> None:
    storage = tmp_path / "storage"
    shutil.copytree(template, storage)
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"storage_dir": str(storage), "min_free_mb": 0},
        "http": {"enabled": False},
        "storage": {"retention": {"results_days": 1}},
    }))
    catalog = Catalog.for_storage(storage)
    files_before, rows_before = len(files_on_disk(storage)), _rows(catalog)
    assert files_before == STUDIES * (INSTANCES + 2)
    mid_unlink = point.startswith("mid-unlink")

    child = subprocess.Popen([sys.executable, "-c", CHILD, str(config), str(10 * DAY)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == str(STUDIES)  # planned
        ready = KILL_POINTS[point](storage)
        deadline = time.monotonic() + 60
        while not ready() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0002)  # polling the directory, not waiting for a guess
        assert child.poll() is None, "the purge ended before the kill point"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(30)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    files_killed, rows_killed, journal_killed = len(files_on_disk(storage)), _rows(catalog), _journal(catalog)
    missing, orphans = inconsistencies(catalog, storage)
    assert missing == set()  # rows go first: never a row pointing at a missing file, even before the restart
    assert len(orphans) <= INSTANCES + 2 and journal_killed <= 1  # at most the one study being unlinked...
    assert journal_killed == 1 or not orphans  # ...and it is in the journal
    if mid_unlink:
        assert journal_killed == 1 and 0 < len(orphans) < INSTANCES + 2

    service = NodeService(load_settings(config))  # the start-up reconcile of a real node
    service.reconcile()
    files_after, rows_after = len(files_on_disk(storage)), _rows(catalog)
    assert inconsistencies(catalog, storage) == (set(), set()) and _journal(catalog) == 0
    studies_left = len(os.listdir(storage / "instances"))
    assert files_after == studies_left * (INSTANCES + 2) and 0 < studies_left < STUDIES
    with catalog.reading() as s:
        assert int(s.scalar(select(func.count()).select_from(Study)) or 0) == studies_left
    print(f"\npurge crash [{point}]: files {files_before} -> {files_killed} after kill -9 -> {files_after} after "
          f"restart; rows {rows_before} -> {rows_killed} -> {rows_after}; journal rows at the kill: {journal_killed}, "
          f"orphan files at the kill: {len(orphans)}; studies left {studies_left}/{STUDIES}")
    service.catalog.engine.dispose()
    catalog.engine.dispose()
