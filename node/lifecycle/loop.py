"""The node's storage keeper: every ``storage.check_seconds`` it purges what retention makes due and,
above the high watermark, the oldest settled studies until below the low one; when nothing more is
eligible and usage stays above the high watermark, the receivers refuse new instances (C-STORE 0xA700,
STOW-RS 503) until space is back (:meth:`StorageKeeper.has_room`, ``/readyz``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from node.catalog import Catalog
from node.config import Settings
from node.lifecycle.guard import StudyGuard
from node.lifecycle.purge import PurgeOutcome, PurgePlan, execute_purge, plan_purge
from node.lifecycle.usage import DiskUsage, disk_usage
from node.spool import Spool

log = logging.getLogger("node.lifecycle")


class StorageKeeper:
    """Retention, watermarks and the receive gate of one node. Purges run one at a time (the loop and
    ``POST /api/v1/storage/purge`` share a lock) and coordinate with the receiver through ``guard``."""

    def __init__(self, settings: Settings, catalog: Catalog, spool: Spool, clock: Callable[[], float],
                 guard: StudyGuard, usage: Callable[[], DiskUsage] | None = None,
                 stopping: Callable[[], bool] | None = None) -> None:
        """``usage``: how the filesystem's usage is measured (default :func:`disk_usage`; tests inject one).
        ``stopping``: the node is stopping (a long purge ends after the study in hand)."""
        self.settings = settings
        self.catalog = catalog
        self.spool = spool
        self.clock = clock
        self.guard = guard
        self.usage = usage or (lambda: disk_usage(settings, catalog))
        self.stopping = stopping
        self._lock = threading.Lock()
        self._refusing = False
        self.last_usage: DiskUsage | None = None

    @property
    def refusing(self) -> bool:
        """Above the high watermark with nothing left to purge: new instances are refused."""
        return self._refusing

    def has_room(self) -> bool:
        """The receivers' gate: False while :attr:`refusing`."""
        return not self._refusing

    def plan(self, *, watermarks: bool = True) -> PurgePlan:
        return plan_purge(self.settings, self.catalog, self.clock(), watermarks=watermarks,
                          usage=self.usage() if watermarks else None)

    def purge(self, *, dry_run: bool, watermarks: bool = True) -> tuple[PurgePlan, PurgeOutcome | None]:
        """Plan (and unless ``dry_run`` execute) a purge now; the gate is updated after a real one."""
        with self._lock:
            plan = self.plan(watermarks=watermarks)
            if dry_run:
                return plan, None
            outcome = execute_purge(self.settings, self.catalog, self.spool, plan, self.clock(), guard=self.guard,
                                    stop=self.stopping)
            self._gate(plan, outcome)
            return plan, outcome

    def tick(self) -> PurgeOutcome | None:
        """One check: purge what is due (or needed by the watermarks), then open or close the gate."""
        return self.purge(dry_run=False)[1]

    def _gate(self, plan: PurgePlan, outcome: PurgeOutcome) -> None:
        usage = self.usage() if outcome.purged or plan.usage is None else plan.usage
        self.last_usage = usage
        high = self.settings.storage.high_watermark_percent
        above = usage.used_percent > high
        refuse = above and (plan.exhausted or not plan.items)
        if refuse and not self._refusing:
            log.warning("storage %.1f%% used, above storage.high_watermark_percent (%.0f%%), and no study is "
                        "eligible to purge: refusing new instances until space is back", usage.used_percent, high)
        elif self._refusing and not refuse:
            log.info("storage %.1f%% used: accepting new instances again", usage.used_percent)
        elif above and not refuse:
            log.warning("storage %.1f%% used, above storage.high_watermark_percent (%.0f%%): purged %d "
                        "study(ies) of the oldest settled", usage.used_percent, high, len(outcome.purged))
        self._refusing = refuse
