"""The purge: a plan (which studies go, why, how much) and its crash-safe execution.

Files and catalog rows go together. For each study, one transaction re-checks that it is still
eligible, deletes its rows and writes a :class:`node.schema.PurgeJournal` row listing the exact files
(and directories) to remove; only after that commit are the files unlinked, the emptied directories
removed and the journal row deleted. A crash at any moment leaves either the rows and files (before
the commit) or a journal row that :func:`finish_journal` completes at start-up: never a row pointing
at a missing file, never an orphan file. While a study is purged, the receiver holds new instances of
it back (:class:`node.lifecycle.guard.StudyGuard`); they are stored after it, in a new study.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from node.catalog import Catalog
from node.config import Settings
from node.lifecycle.eligibility import Reason, Scope, Verdict, decide_all, watermark_order
from node.lifecycle.facts import footprint, footprints, load_facts, related_ids
from node.lifecycle.guard import StudyGuard, require_node_stopped
from node.lifecycle.usage import DiskUsage, disk_usage
from node.schema import (
    Delivery,
    Instance,
    Job,
    PriorFetch,
    PurgeJournal,
    PurgeMark,
    Result,
    Series,
    SeriesOrigin,
    Study,
)
from node.spool import Spool

log = logging.getLogger("node.lifecycle")


@dataclass(frozen=True)
class PurgeItem:
    """One study a plan would purge."""

    study_id: int
    study_uid: str
    scope: Scope
    reason: Reason
    settled_at: float
    files: int
    bytes: int
    rows: int


@dataclass(frozen=True)
class PurgePlan:
    """What a purge would remove now, and why (``dicom-node purge --dry-run``, ``GET /api/v1/storage``)."""

    created_at: float
    items: tuple[PurgeItem, ...]
    usage: DiskUsage | None = None
    """The usage the watermarks were checked against (None: retention only)."""
    kept: dict[str, int] = field(default_factory=dict)
    """Studies kept, counted by why (``receiving``, ``deliveries pending``, ``retention not due yet``...)."""
    target_bytes: int = 0
    """Bytes the watermarks need freed to get below ``low_watermark_percent`` (0: below the high one)."""
    exhausted: bool = False
    """Every eligible study is in the plan (above the high watermark, nothing more could be freed)."""

    @property
    def files(self) -> int:
        return sum(i.files for i in self.items)

    @property
    def bytes(self) -> int:
        return sum(i.bytes for i in self.items)

    @property
    def rows(self) -> int:
        return sum(i.rows for i in self.items)

    def to_dict(self) -> dict[str, Any]:
        return {"created_at": self.created_at, "files": self.files, "bytes": self.bytes, "rows": self.rows,
                "studies": len(self.items), "target_bytes": self.target_bytes, "exhausted": self.exhausted,
                "kept": dict(self.kept), "usage": asdict(self.usage) if self.usage else None,
                "items": [{**asdict(i), "scope": str(i.scope), "reason": str(i.reason)} for i in self.items]}


@dataclass
class PurgeOutcome:
    """What :func:`execute_purge` did."""

    purged: list[PurgeItem] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    """Studies of the plan left alone, with why (no longer eligible, gone...)."""
    files: int = 0
    """Files unlinked."""
    bytes: int = 0
    rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"studies": len(self.purged), "files": self.files, "bytes": self.bytes, "rows": self.rows,
                "purged": [i.study_id for i in self.purged], "skipped": {str(k): v for k, v in self.skipped.items()}}


def _items(s: Session, chosen: dict[int, tuple[Verdict, Scope, Reason]], uids: dict[int, str],
           storage: Path) -> dict[int, PurgeItem]:
    sizes = footprints(s, {sid: scope for sid, (_v, scope, _r) in chosen.items()}, storage)
    return {sid: PurgeItem(sid, uids[sid], scope, reason, v.settled_at or 0.0, *sizes[sid])
            for sid, (v, scope, reason) in chosen.items()}


def watermark_target(settings: Settings, usage: DiskUsage) -> int:
    """Bytes to free to get below the low watermark, or 0 while usage is not above the high one."""
    st = settings.storage
    if usage.used_percent <= st.high_watermark_percent:
        return 0
    visible = usage.used + usage.free
    return max(0, usage.used - int(visible * st.low_watermark_percent / 100))


def plan_purge(settings: Settings, catalog: Catalog, now: float, *, watermarks: bool = True,
               usage: DiskUsage | None = None) -> PurgePlan:
    """Which studies would go now, why (a retention rule or the watermark), and their files, bytes and
    catalog rows. Retention: every study whose rule is due. ``watermarks``: above
    ``storage.high_watermark_percent`` (of ``usage``, measured when not given), also the oldest settled
    studies (whole) until the bytes freed reach ``storage.low_watermark_percent``. Changes nothing."""
    storage = settings.node.storage_dir
    if watermarks and usage is None:
        usage = disk_usage(settings, catalog)
    with catalog.reading() as s:
        facts = load_facts(s)
        uids = {f.study_id: f.study_uid for f in facts}
        verdicts = decide_all(facts, settings.storage.retention, now)
        kept = Counter(v.why for v in verdicts.values() if v.scope is None)
        items = _items(s, {v.study_id: (v, v.scope, v.reason) for v in verdicts.values()
                           if v.scope is not None and v.reason is not None}, uids, storage)
        target = watermark_target(settings, usage) if watermarks and usage is not None else 0
        freed = sum(i.bytes for i in items.values())
        exhausted = False
        if target:
            queue = deque(v for v in watermark_order(verdicts.values())
                          if v.study_id not in items or items[v.study_id].scope != Scope.STUDY)
            left = 0
            while freed < target and queue:  # sized in batches: the oldest first, as many as needed
                batch = [queue.popleft() for _ in range(min(len(queue), 200))]
                whole = _items(s, {v.study_id: (v, Scope.STUDY, Reason.WATERMARK) for v in batch}, uids, storage)
                for n, v in enumerate(batch):
                    if freed >= target:
                        left = len(batch) - n
                        break
                    old = items.get(v.study_id)  # an instances item becomes the whole study
                    items[v.study_id] = whole[v.study_id]
                    freed += whole[v.study_id].bytes - (old.bytes if old else 0)
                    if old is None:
                        kept[v.why] -= 1
            exhausted = not queue and not left
    ordered = sorted(items.values(), key=lambda i: (i.settled_at, i.study_id))
    return PurgePlan(now, tuple(ordered), usage, {k: n for k, n in kept.items() if n > 0}, target, exhausted)


def _dirs(paths: list[str]) -> list[str]:
    """The directories holding ``paths`` below their area (``instances/``, ``results/``), deepest first."""
    out: set[str] = set()
    for p in paths:
        parents = PurePosixPath(p).parents
        out.update(str(d) for d in list(parents)[:-2])  # not "." nor the area itself
    return sorted(out, key=lambda d: (-d.count("/"), d))


def _delete_rows(s: Session, study_id: int, scope: Scope, now: float, files: int, size: int) -> None:
    series = select(Series.id).where(Series.study_id == study_id)
    if scope == Scope.INSTANCES:
        received = series.where(Series.origin == SeriesOrigin.RECEIVED)
        s.execute(delete(Instance).where(Instance.series_id.in_(received)))
        s.execute(update(Series).where(Series.id.in_(received)).values(instance_count=0))
        s.execute(update(Study).where(Study.id == study_id).values(instance_count=0))
        s.merge(PurgeMark(study_id=study_id, purged_at=now, reason=Reason.INSTANCES_DAYS.value, files=files,
                          bytes=size))
        return
    jobs = select(Job.id).where(Job.study_id == study_id)
    results = select(Result.id).where(Result.job_id.in_(jobs))
    s.execute(delete(Delivery).where(Delivery.result_id.in_(results)))
    s.execute(delete(Result).where(Result.job_id.in_(jobs)))
    s.execute(delete(Job).where(Job.study_id == study_id))
    s.execute(delete(Instance).where(Instance.series_id.in_(series)))
    s.execute(delete(PriorFetch).where(PriorFetch.study_id == study_id))
    s.execute(delete(PurgeMark).where(PurgeMark.study_id == study_id))
    s.execute(delete(Series).where(Series.study_id == study_id))
    s.execute(delete(Study).where(Study.id == study_id))


def remove_files(storage: Path, paths: list[str], dirs: list[str]) -> int:
    """Unlink ``paths`` (a missing one is fine) and remove ``dirs`` that are empty; returns files unlinked."""
    n = 0
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(storage / p)
            n += 1
    for d in dirs:
        with contextlib.suppress(OSError):  # not empty (a new instance arrived since), or gone
            os.rmdir(storage / d)
    return n


def _recheck(s: Session, item: PurgeItem, now: float, settings: Settings) -> str | None:
    """Why ``item`` may no longer go (None: it may), judged inside the purge's transaction."""
    verdicts = decide_all(load_facts(s, related_ids(s, item.study_id)), settings.storage.retention, now)
    v = verdicts.get(item.study_id)
    uid = s.scalar(select(Study.study_uid).where(Study.id == item.study_id))
    if v is None or uid != item.study_uid:
        return "gone"
    if not v.settled:
        return v.why
    if item.reason != Reason.WATERMARK and v.scope is None:
        return v.why
    return None


def purge_study(settings: Settings, catalog: Catalog, item: PurgeItem, now: float) -> tuple[int, int, int] | str:
    """Purge one study of a plan (the caller holds its guard): (files, bytes, rows), or why not."""
    storage = settings.node.storage_dir
    with catalog.session() as s:
        why = _recheck(s, item, now, settings)
        if why is not None:
            return why
        fp = footprint(s, item.study_id, item.scope, storage)
        paths = list(fp.paths)
        dirs = _dirs(paths)
        _delete_rows(s, item.study_id, item.scope, now, len(paths), fp.bytes)
        journal = PurgeJournal(study_uid=item.study_uid, paths=paths, dirs=dirs, created_at=now)
        s.add(journal)
        s.flush()
        journal_id = journal.id
    files = remove_files(storage, paths, dirs)  # the rows are gone: from here the journal finishes it
    with catalog.session() as s:
        s.execute(delete(PurgeJournal).where(PurgeJournal.id == journal_id))
    return files, fp.bytes, fp.rows


def execute_purge(settings: Settings, catalog: Catalog, spool: Spool, plan: PurgePlan, now: float, *,
                  guard: StudyGuard | None = None, stop: Callable[[], bool] | None = None) -> PurgeOutcome:
    """Purge the studies of ``plan``, oldest first, each crash-safely (see the module). Each study is
    checked again in the transaction that deletes it: one no longer eligible (a rerun, new instances)
    is skipped. ``guard``: the node's receiver guard; a purge outside the node (the CLI) passes none and
    is refused with :class:`node.lifecycle.guard.NodeRunningError` while the node runs on the same
    storage directory (:func:`node.lifecycle.guard.require_node_stopped`). ``stop``: checked between studies."""
    del spool  # files are removed by their catalog paths, relative to the storage directory (the spool root)
    if guard is None:
        require_node_stopped(settings.node.storage_dir)
        guard = StudyGuard()
    out = PurgeOutcome()
    for item in plan.items:
        if stop is not None and stop():
            break
        with guard.purging(item.study_uid):
            done = purge_study(settings, catalog, item, now)
        if isinstance(done, str):
            out.skipped[item.study_id] = done
            continue
        out.purged.append(item)
        out.files += done[0]
        out.bytes += done[1]
        out.rows += done[2]
        log.info("study #%d purged (%s, %s): %d file(s), %d bytes, %d row(s)", item.study_id, item.scope,
                 item.reason, done[0], done[1], done[2])
    return out


def finish_journal(catalog: Catalog, storage: Path) -> tuple[int, int]:
    """Complete purges a crash interrupted (rows deleted, files maybe not): unlink their files, remove
    their emptied directories, delete their journal rows. Returns (journal rows, files unlinked)."""
    with catalog.session() as s:
        entries = [(j.id, list(j.paths), list(j.dirs)) for j in s.scalars(select(PurgeJournal))]
    files = 0
    for jid, paths, dirs in entries:
        files += remove_files(storage, paths, dirs)
        with catalog.session() as s:
            s.execute(delete(PurgeJournal).where(PurgeJournal.id == jid))
    return len(entries), files


def instances_purged(catalog: Catalog, study_id: int) -> bool:
    """Whether the study's received instances were purged (a rerun or retry has nothing to read)."""
    with catalog.reading() as s:
        return s.get(PurgeMark, study_id) is not None
