"""Delivery loop: pending delivery rows -> sender -> sent, or back off and retry. Never dropped.

Backoff doubles from ``send.retry_initial_seconds`` up to ``send.retry_max_seconds``; a delivery
stays pending (with its last error visible in ``dicom-node status``) until the destination takes it.
Deliveries to a paused destination (``POST /api/v1/destinations/{name}/pause``) stay pending, untried,
until it is resumed.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.errors import SendError
from node.catalog import Catalog
from node.config import DicomwebDestination, Settings
from node.send.base import Sender
from node.send.dimse import DimseSender
from node.send.stow import StowSender
from node.spool import Spool

log = logging.getLogger("node.send")

SenderFactory = Callable[[str], Sender]


@dataclass(frozen=True)
class DeliveryBatch:
    """Passed to ``on_batch`` once per destination per pass that attempted deliveries (typed event; the
    audit trail subscribes): what was sent, per study, and how many failed. UIDs only, no tag values."""

    destination: str
    """The ``destinations`` entry's name."""
    studies: dict[str, dict[str, int]]
    """Sent instances: Study Instance UID -> SOP Class UID -> count."""
    failed: int
    error: str | None = None
    """The first failure's reason, when some failed."""


def default_sender_factory(settings: Settings) -> SenderFactory:
    def make(name: str) -> Sender:
        destination = settings.destination(name)
        if isinstance(destination, DicomwebDestination):
            return StowSender(destination, settings.send.association_timeout_seconds)
        return DimseSender(destination, settings.node.ae_title, settings.send.association_timeout_seconds)

    return make


class Deliverer:
    def __init__(self, settings: Settings, catalog: Catalog, spool: Spool, clock: Callable[[], float],
                 sender_factory: SenderFactory | None = None, *,
                 on_batch: Callable[[DeliveryBatch], None] | None = None) -> None:
        """``on_batch``: what each pass sent to each destination (:class:`DeliveryBatch`)."""
        self.settings = settings
        self.catalog = catalog
        self.spool = spool
        self.clock = clock
        self.sender_factory = sender_factory or default_sender_factory(settings)
        self.on_batch = on_batch

    def backoff(self, attempts: int) -> float:
        s = self.settings.send
        return float(min(s.retry_max_seconds, s.retry_initial_seconds * 2 ** max(0, attempts - 1)))

    def tick(self) -> int:
        """Attempt every due delivery once (those to a paused destination are held); returns the number sent."""
        due = self.catalog.due_deliveries(self.clock(), skip_paused=True)
        by_dest: dict[str, list[tuple[int, Path, int]]] = defaultdict(list)
        variants: dict[str, dict[Path, str]] = defaultdict(dict)
        studies: dict[str, set[int]] = defaultdict(set)
        what: dict[Path, tuple[int, str]] = {}
        """Each file's study (catalog id) and SOP Class, for ``on_batch``."""
        for d, r, study_id in due:
            path = self.spool.path(r.path)
            what[path] = (study_id, r.sop_class_uid)
            by_dest[d.destination].append((d.id, path, d.attempts))
            if r.variant:
                variants[d.destination][path] = r.variant
            studies[d.destination].add(study_id)
        sent_total = 0
        for dest, items in by_dest.items():
            not_needed: set[Path] = set()
            try:
                report = self.sender_factory(dest).send([p for _, p, _ in items], variants[dest])
                failures = report.failed
                sent = set(report.sent)
                not_needed = set(report.not_needed)
            except SendError as exc:
                failures = {p: str(exc) for _, p, _ in items}
                sent = set()
            except Exception as exc:  # a sender bug must not stop the loop or lose the delivery
                log.exception("sender for %s crashed", dest)
                failures = {p: type(exc).__name__ for _, p, _ in items}
                sent = set()
            for delivery_id, path, attempts in items:
                if path in sent:
                    self.catalog.delivery_sent(delivery_id, self.clock())
                    sent_total += 1
                elif path in not_needed:
                    self.catalog.delivery_not_needed(delivery_id, self.clock())
                else:
                    reason = failures.get(path, "not sent")
                    delay = self.backoff(attempts + 1)
                    self.catalog.delivery_failed(delivery_id, reason, self.clock() + delay, now=self.clock())
            ids = ", ".join(f"#{i}" for i in sorted(studies[dest]))
            if sent:
                log.info("study %s: delivered %d object(s) to %s", ids, len(sent), dest)
            if failures:
                log.warning("study %s: %d object(s) not delivered to %s (%s); retrying with backoff",
                            ids, len(failures), dest, next(iter(failures.values())))
            failed = sum(1 for _, p, _ in items if p not in sent and p not in not_needed)
            self._report(dest, [what[p] for _, p, _ in items if p in sent], failed,
                         next(iter(failures.values()), None) if failed else None)
        return sent_total

    def _report(self, dest: str, sent: list[tuple[int, str]], failed: int, error: str | None) -> None:
        """One :class:`DeliveryBatch` to ``on_batch`` (never raises into the loop)."""
        if self.on_batch is None or (not sent and not failed):
            return
        try:
            uids: dict[int, str] = {}
            studies: dict[str, dict[str, int]] = {}
            for study_id, sop_class in sent:
                if study_id not in uids:
                    study = self.catalog.get_study(study_id)
                    uids[study_id] = study.study_uid if study is not None else f"#{study_id}"
                by_class = studies.setdefault(uids[study_id], {})
                by_class[sop_class] = by_class.get(sop_class, 0) + 1
            self.on_batch(DeliveryBatch(dest, studies, failed, error))
        except Exception:
            log.exception("on_batch hook failed")
