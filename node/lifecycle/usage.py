"""Disk usage of the storage filesystem (``node.storage_dir``), with bytes by area.

Cheap on a large spool: instance and result bytes come from the catalog (``instances.size``; result
files not served as instances are stat'ed, a few per job), only the small areas (queue, catalog,
audit, tmp) are walked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select

from node.audit import audit_dir
from node.catalog import Catalog
from node.config import Settings
from node.lifecycle.facts import unserved_results
from node.queue import queue_dir
from node.schema import Instance, Result, Series, SeriesOrigin

AREAS = ("instances", "results", "queue", "catalog", "audit", "tmp")
"""The areas of :attr:`DiskUsage.areas`, in display order."""


@dataclass(frozen=True)
class DiskUsage:
    """The filesystem holding ``node.storage_dir``: sizes in bytes, ``used_percent`` as ``df`` shows it
    (used / (used + available to unprivileged users))."""

    total: int
    used: int
    free: int
    used_percent: float
    areas: dict[str, int] = field(default_factory=dict)
    """Bytes by area (:data:`AREAS`)."""


def filesystem_usage(path: Path) -> tuple[int, int, int, float]:
    """(total, used, free, used_percent) of the filesystem holding ``path`` (``os.statvfs``)."""
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    visible = used + free
    return total, used, free, (100.0 * used / visible if visible else 0.0)


def _walk_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` (0 when it does not exist)."""
    total = 0
    stack = [root]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(Path(e.path))
                    elif e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    return total


def _file_bytes(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size
        except OSError:
            continue
    return total


def catalog_bytes(catalog: Catalog, storage_dir: Path) -> tuple[int, int]:
    """(instance bytes, result bytes) from the catalog; result files that are not also served as
    instances of a result series are stat'ed."""
    with catalog.reading() as s:
        by_origin = dict(s.execute(select(Series.origin, func.coalesce(func.sum(Instance.size), 0))
                                   .join(Instance, Instance.series_id == Series.id).group_by(Series.origin)).all())
        unserved = s.scalars(select(Result.path).where(unserved_results())).all()
    results = int(by_origin.get(SeriesOrigin.RESULT, 0)) + _file_bytes([storage_dir / p for p in unserved])
    return int(by_origin.get(SeriesOrigin.RECEIVED, 0)), results


def disk_usage(settings: Settings, catalog: Catalog | None = None) -> DiskUsage:
    """Usage of the filesystem holding ``node.storage_dir`` and bytes by area. ``catalog``: the node's
    open catalog (one is opened on the storage directory when omitted)."""
    storage = settings.node.storage_dir
    total, used, free, percent = filesystem_usage(storage)
    cat = catalog if catalog is not None else Catalog.for_settings(settings)
    try:
        instances, results = catalog_bytes(cat, storage)
    finally:
        if catalog is None:
            cat.close()
    db = storage / "catalog.sqlite3"
    areas = {
        "instances": instances,
        "results": results,
        "queue": _walk_bytes(queue_dir(settings)) if settings.embedded_broker else 0,
        "catalog": _file_bytes([db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]),
        "audit": _walk_bytes(audit_dir(settings)),
        "tmp": _walk_bytes(storage / "tmp"),
    }
    return DiskUsage(total=total, used=used, free=free, used_percent=percent, areas=areas)
