"""The notifier: detect events (catalog scan + typed hooks), record them in the outbox, send what is due.

Two ticks, run by :class:`node.service.NodeService` in their own loops so a slow webhook or SMTP
server never delays the pipeline: :meth:`Notifier.detect_tick` and :meth:`Notifier.send_tick`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from node.catalog import Catalog
from node.config import Settings
from node.notify.detect import DestinationHealth, Detector, UsageFn
from node.notify.events import Event, payload, subscribed
from node.notify.outbox import Outbox
from node.notify.send import NotificationSender, make_sender
from node.send.deliver import DeliveryBatch
from node.version import software_version

log = logging.getLogger("node.notify")

SEND_BATCH = 50
"""Outbox rows attempted per pass."""
KEEP_DAYS = 30
"""Events and their outbox rows are kept this long (then pruned, once an hour), except pending ones."""
PRUNE_EVERY_SECONDS = 3600.0


def storage_usage(settings: Settings) -> UsageFn:
    """The storage filesystem's usage (``os.statvfs``: cheap, no walk)."""
    from node.lifecycle.usage import filesystem_usage

    return lambda: filesystem_usage(settings.node.storage_dir)


class Notifier:
    def __init__(self, settings: Settings, catalog: Catalog, clock: Callable[[], float] = time.time, *,
                 usage: UsageFn | None = None, senders: Mapping[str, NotificationSender] | None = None) -> None:
        """``usage``: (total, used, free, used percent) of the storage filesystem, default
        :func:`storage_usage`; ``senders``: target name -> sender (tests), default one per target."""
        self.settings = settings
        self.ns = settings.notifications
        self.clock = clock
        self.outbox = Outbox(catalog)
        self.health = DestinationHealth(clock)
        self.detector = Detector(settings, catalog, self.outbox, self.health,
                                 usage if usage is not None else storage_usage(settings))
        self._pruned_at = -float("inf")
        self.node = {"ae_title": settings.node.ae_title, "software_version": software_version()}
        self.senders: Mapping[str, NotificationSender] = senders if senders is not None else {
            t.name: make_sender(t, self.ns.smtp, settings.node.ae_title, clock) for t in self.ns.targets}

    # ---- typed hooks ---------------------------------------------------------------------------
    def delivery_batch(self, batch: DeliveryBatch) -> None:
        """``Deliverer(on_batch=...)``: a destination's pass delivered something, or failed entirely."""
        self.health.batch(batch)

    def jobs_lost(self, job_ids: Iterable[int]) -> None:
        """The jobs :meth:`node.catalog.Catalog.requeue_abandoned` just took back from a lost worker
        (recorded at once: the job may run again and finish before the next scan)."""
        ids = list(job_ids)
        if not ids or "worker-lost" not in self.detector.wanted:
            return
        try:  # called from the pipeline loop: never fail its pass (the next scan finds them anyway)
            self._record(self.detector.workers_lost(job_ids=ids), self.clock())
        except Exception:
            log.exception("notifier: recording lost workers failed")

    # ---- loops -------------------------------------------------------------------------------
    def detect_tick(self) -> int:
        """Scan for events and record new ones with their outbox rows; returns how many were new."""
        now = self.clock()
        since = self.outbox.mark("since")
        if since is None:  # first run on this catalog: what happened before is not announced
            self.outbox.set_mark("since", now)
            since = now
        n = self._record(self.detector.scan(now, since), now)
        self.outbox.set_mark("since", max(since, now))
        if now - self._pruned_at >= PRUNE_EVERY_SECONDS:
            self._pruned_at = now
            pruned = self.outbox.prune(now - KEEP_DAYS * 86400)
            if pruned:
                log.info("notifier: forgot %d event(s) older than %d days", pruned, KEEP_DAYS)
        return n

    def _record(self, events: list[Event], now: float) -> int:
        known = self.outbox.known(e.key for e in events)
        n = 0
        for e in events:
            if e.key in known:
                continue
            targets = [t.name for t in self.ns.targets if subscribed(t, e)]
            event_id = self.outbox.record(e, targets, now, self.node)
            if event_id is not None:
                n += 1
                known.add(e.key)
                log.info("notification event #%d %s (%s) for %d target(s)", event_id, e.event, e.key, len(targets))
        return n

    def backoff(self, attempts: int) -> float:
        return float(min(self.ns.retry_max_seconds, self.ns.retry_initial_seconds * 2 ** max(0, attempts - 1)))

    def send_tick(self) -> int:
        """Attempt every due outbox row once; returns how many were sent."""
        sent = 0
        for due in self.outbox.due(self.clock(), SEND_BATCH):
            sender = self.senders.get(due.target)
            if sender is None:
                self.outbox.drop(due.id, "target no longer configured")
                log.warning("notification #%d dropped: target %s is no longer configured", due.id, due.target)
                continue
            try:
                sender.send(due.event, due.id, due.payload)
            except Exception as exc:  # NotificationError, or a bug: either way the row is kept and retried
                self._failed(due.id, due.target, due.event, exc)
                continue
            self.outbox.sent(due.id, self.clock())
            sent += 1
            log.info("notification #%d (%s) sent to %s", due.id, due.event, due.target)
        return sent

    def _failed(self, outbox_id: int, target: str, event: str, exc: Exception) -> None:
        now = self.clock()

        def retry_at(attempts: int) -> float | None:
            return None if attempts >= self.ns.max_attempts else now + self.backoff(attempts)

        error = str(exc) or type(exc).__name__
        attempts = self.outbox.failed(outbox_id, error, retry_at)
        if attempts >= self.ns.max_attempts:
            log.error("notification #%d (%s) to %s dropped after %d attempt(s): %s",
                      outbox_id, event, target, attempts, error)
        else:
            log.warning("notification #%d (%s) to %s failed (attempt %d): %s; retrying in %.0f s",
                        outbox_id, event, target, attempts, error, self.backoff(attempts))

    def tick(self) -> int:
        """Detect, then send (tests and one-shot use); returns how many were sent."""
        self.detect_tick()
        return self.send_tick()


def send_test(settings: Settings, target: str, clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """Send a ``test`` event to the target named ``target`` now, without the outbox (for a CLI or API
    "send a test notification"); returns the payload sent. Raises :class:`KeyError` for an unknown
    target and :class:`models.errors.NotificationError` when it was not taken."""
    ns = settings.notifications
    found = [t for t in ns.targets if t.name == target]
    if not found:
        raise KeyError(f"no notification target {target!r}; configured: {', '.join(t.name for t in ns.targets)}")
    node = {"ae_title": settings.node.ae_title, "software_version": software_version()}
    doc = payload(Event(f"test:{clock():.3f}", "test", {"target": target}), 0, clock(), node)
    make_sender(found[0], ns.smtp, settings.node.ae_title, clock).send("test", 0, doc)
    return doc
