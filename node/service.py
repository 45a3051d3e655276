"""The node process: receiver + the assemble/route/enqueue loop + the delivery loop.

Stages never call into each other: each loop reads the catalog and writes the catalog. At start-up
the node reconciles what a crash may have left: temp files are removed, jobs whose queue message
may be lost are sent again (a job runs once: workers claim it in the catalog), pending deliveries
are simply due again, and purges a crash cut short are finished (:mod:`node.lifecycle`).

The audit trail (:mod:`node.audit`) is wired here: the receiver, the retriever, the deliverer and the
HTTP app report through their typed hooks (none of them imports it); start and stop are recorded here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from node.assemble import Assembler
from node.audit import AuditTrail
from node.batch import BatchRunner
from node.catalog import Catalog
from node.completion import CompletionTracker
from node.config import Settings
from node.enqueue import Dispatch, Enqueuer
from node.http.app import create_app as create_http_app
from node.http.context import NodeContext
from node.http.server import HttpServer
from node.lifecycle.guard import NodeLock, StudyGuard
from node.lifecycle.loop import StorageKeeper
from node.lifecycle.purge import finish_journal
from node.metrics import NodeMetrics
from node.notify import Notifier
from node.policy import job_policy
from node.queue import broker_reachable, create_app
from node.receive.scp import Receiver
from node.retrieve import PriorRetriever
from node.route import Router
from node.send.deliver import Deliverer, SenderFactory
from node.spool import Spool

log = logging.getLogger("node.service")
LEASE_CHECK_SECONDS = 2.0
"""How often the pipeline loop looks for jobs whose worker is lost (``queue.worker_lost_seconds`` is 10 s at least)."""


class NodeService:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time,
                 sender_factory: SenderFactory | None = None) -> None:
        self.settings = settings
        self.clock = clock
        storage = settings.node.storage_dir
        storage.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog.for_settings(settings)
        self.spool = Spool(storage)
        self.metrics = NodeMetrics(settings, self.catalog, self.spool)  # /metrics; hooked into the receiver
        audit = self.audit = AuditTrail.from_settings(settings, clock) if settings.audit.enabled else None
        self.completion = CompletionTracker.from_settings(settings, clock)  # early completion's facts, in memory
        self.receiver = Receiver(settings, self.catalog, self.spool, clock, on_stored=self.completion.stored,
                                 on_answered=self.metrics.answered,
                                 on_accepted=self.metrics.accepted,
                                 on_association=audit.association if audit else None,
                                 on_received=_fan_out(audit.instances_received if audit else None,
                                                      self.completion.ended))
        self.assembler = Assembler(self.catalog, settings.assembly.study_quiet_seconds, clock, self.completion)
        self.study_guard = StudyGuard()  # a purge of a study holds its new instances back (node.lifecycle)
        self.storage = StorageKeeper(settings, self.catalog, self.spool, clock, self.study_guard,
                                     stopping=lambda: self._stop.is_set())
        self.receiver.room_gate, self.receiver.study_guard = self.storage.has_room, self.study_guard.receiving
        self.node_lock = NodeLock(storage)  # tells the CLI the node runs (node.lifecycle.guard.node_running)
        self.retriever = PriorRetriever.from_settings(settings, self.catalog, self.spool, self.receiver.store, clock,
                                                      on_exchange=audit.prior_exchange if audit else None)
        self.batches = BatchRunner.from_settings(settings, self.catalog, self.receiver.store, clock,
                                                 on_exchange=audit.prior_exchange if audit else None)
        self.router = Router(self.catalog, settings.rules, clock, priors_from_pacs=settings.priors is not None,
                             fixed_plan=self.batches.plan_for)  # a batch's studies run its model only
        self.celery = create_app(settings)
        self.enqueuer = Enqueuer(self.celery, self.catalog, clock,
                                 queue_of=lambda model: settings.model_settings(model).queue,
                                 dispatch=Dispatch.from_settings(settings))  # priorities, fair share, limits
        self.notifier = Notifier(settings, self.catalog, clock) if settings.notifications.targets else None
        self.deliverer = Deliverer(settings, self.catalog, self.spool, clock, sender_factory,
                                   on_batch=_fan_out(audit.delivered if audit else None,
                                                     self.notifier.delivery_batch if self.notifier else None))
        self.job_policy = job_policy(settings)
        self.http = self._http_server() if settings.http.enabled else None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._leases_checked_at = float("-inf")

    def _http_server(self) -> HttpServer:
        ctx = NodeContext(self.settings, self.catalog, self.spool, self.receiver, self.clock,
                          broker_reachable=lambda: broker_reachable(self.celery), metrics=self.metrics,
                          on_audit=self.audit.http if self.audit else None, storage=self.storage)
        h = self.settings.http
        return HttpServer(create_http_app(ctx), h.host, h.port, timeout_seconds=h.timeout_seconds,
                          certfile=h.tls.cert_file if h.tls else None, keyfile=h.tls.key_file if h.tls else None)

    def reconcile(self) -> None:
        removed = self.spool.clean_temp()
        requeued = self.catalog.forget_enqueued()  # jobs left awaiting a prior are handed over by the next tick
        purges, unlinked = finish_journal(self.catalog, self.settings.node.storage_dir)  # purges a crash cut short
        log.info("reconciled: %d temp file(s) removed, %d unfinished job(s) to enqueue again, %d purge(s) finished "
                 "(%d file(s) removed)", removed, requeued, purges, unlinked)

    def pipeline_tick(self) -> None:
        self.assembler.tick()
        self.router.route_ready()
        if self.retriever is not None:  # fetches the priors of jobs routing created awaiting-prior
            self.retriever.tick()
        now = self.clock()
        if not now - LEASE_CHECK_SECONDS < self._leases_checked_at <= now:
            self._leases_checked_at = now
            self._check_leases(now)
        self.enqueuer.enqueue_pending()

    def _check_leases(self, now: float) -> None:
        """Running jobs whose worker is lost go back to the queue; queued jobs whose message is stale are
        sent again (every :data:`LEASE_CHECK_SECONDS`, not every tick: a scan of running jobs with their
        workers' heartbeats cost 6-8 % of the receive path's CPU during ingest when run every 0.2 s)."""
        lost = self.catalog.requeue_abandoned(now, self.job_policy)
        for job_id in lost:
            log.warning("job #%d lost its worker; queued again (or failed if out of attempts)", job_id)
        if lost and self.notifier is not None:
            self.notifier.jobs_lost(lost)
        self.catalog.resend_stale_queued(now, self.job_policy.lease_seconds)

    def _loop(self, name: str, tick: Callable[[], object], interval: float) -> None:
        while not self._stop.is_set():
            try:
                tick()
            except Exception:  # a failing pass is logged and tried again; the node keeps serving
                log.exception("%s loop pass failed", name)
            self._stop.wait(interval)

    def start(self) -> None:
        if self.audit is not None:
            self.audit.application_started()
        if not self.node_lock.acquire():
            log.warning("another process holds %s: is a second node running on this storage directory?",
                        self.node_lock.path)
        self.reconcile()
        self.receiver.start()
        if self.http is not None:
            self.http.start()
        loops: list[tuple[str, Callable[[], object], float]] = [
            ("pipeline", self.pipeline_tick, self.settings.assembly.poll_seconds),
            ("send", self.deliverer.tick, self.settings.send.poll_seconds),
            ("lifecycle", self.storage.tick, self.settings.storage.check_seconds),
            ("batch", self.batches.tick, self.settings.batch.poll_seconds),  # one study at a time
        ]
        if self.notifier is not None:  # own loops: a slow webhook or SMTP server never delays the pipeline
            poll = self.settings.notifications.poll_seconds
            loops += [("notify", self.notifier.detect_tick, poll), ("notify-send", self.notifier.send_tick, poll)]
        for name, tick, interval in loops:
            t = threading.Thread(target=self._loop, args=(name, tick, interval), name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        if self.http is not None:
            self.http.stop()
        self.receiver.stop()
        if self.retriever is not None:
            self.retriever.stop()
        for t in self._threads:
            t.join(timeout=30)
        if self.audit is not None:
            self.audit.application_stopped()
            self.audit.close()
        self.node_lock.release()


_Event = TypeVar("_Event")


def _fan_out(*hooks: Callable[[_Event], None] | None) -> Callable[[_Event], None] | None:
    """One hook (``on_batch``, ``on_received``) calling each of ``hooks`` that is set (None when none is)."""
    present = [h for h in hooks if h is not None]
    if len(present) <= 1:
        return present[0] if present else None

    def call(event: _Event) -> None:
        for h in present:
            try:
                h(event)
            except Exception:  # one subscriber's failure must not keep the event from the others
                log.exception("hook failed")

    return call
