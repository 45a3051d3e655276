"""The node's Prometheus metrics (served at ``/metrics`` by :mod:`node.http.metrics`).

One :class:`NodeMetrics` per node (per app in tests): its own ``CollectorRegistry``, never the
global default one. Two sources:

* counters in the node process, fed by the receiver's typed hooks (``Receiver(on_answered=...,
  on_accepted=...)``, wired by :mod:`node.service`): instances and bytes received per door and
  calling AE, associations accepted, statuses answered;
* :class:`CatalogCollector`, which reads the catalog at scrape time with SQL aggregates: job stage
  durations (written by workers, wherever they run), study turnaround, queue depth, jobs,
  deliveries, paused destinations, plus the spool's free space. Several processes and worker hosts
  therefore need no Prometheus multiprocess mode: the catalog is the shared state.

Labels carry model, destination, queue and AE names and states, never tag values.

The receiver's hooks also keep each peer's activity (:class:`PeerActivity`: associations, instances,
last association) in memory since the node started, for the dashboard (``GET /api/v1/peers``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import ColumnElement, case, func, select

from node.catalog import Catalog
from node.config import Settings
from node.receive.scp import STATUS_SUCCESS, Answered
from node.schema import Delivery, DeliveryState, DestinationState, Job, JobState, Result, Study
from node.spool import Spool

log = logging.getLogger("node.metrics")

STAGE_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
"""Upper bounds (seconds) of the job stage histograms."""
TURNAROUND_BUCKETS: tuple[float, ...] = (5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
"""Upper bounds (seconds) of the study turnaround histogram (last instance received -> all sent)."""
STAGES = ("load", "infer", "encode")


def _stored(status: int) -> bool:
    return status in (STATUS_SUCCESS, 0x0001) or 0xB000 <= status <= 0xBFFF


@dataclass(frozen=True)
class PeerActivity:
    """What one sender did since the node started (in memory): its calling AE title (DIMSE) or the
    name of its token (STOW-RS)."""

    door: str
    """``dimse`` or ``stow``."""
    source: str
    associations: int = 0
    instances: int = 0
    bytes: int = 0
    last_association_at: float | None = None
    last_instance_at: float | None = None


class NodeMetrics:
    """The node's registry: receive counters plus the catalog collector."""

    def __init__(self, settings: Settings, catalog: Catalog, spool: Spool,
                 clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._peers: dict[tuple[str, str], PeerActivity] = {}
        self._peers_lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.instances = Counter("dicom_node_received_instances", "Instances stored, by door and calling AE",
                                 ["door", "calling_ae"], registry=self.registry)
        self.bytes = Counter("dicom_node_received_bytes", "Bytes of the instances stored, by door and calling AE",
                             ["door", "calling_ae"], registry=self.registry)
        self.statuses = Counter("dicom_node_store_statuses", "Statuses answered per instance (C-STORE, STOW-RS)",
                                ["door", "status"], registry=self.registry)
        self.associations = Counter("dicom_node_associations_accepted", "DICOM associations accepted",
                                    ["calling_ae"], registry=self.registry)
        self.registry.register(CatalogCollector(settings, catalog, spool))

    def answered(self, event: Answered) -> None:
        """``Receiver(on_answered=...)``: one instance answered."""
        self.statuses.labels(event.door, f"0x{event.status:04X}").inc()
        if _stored(event.status):
            self.instances.labels(event.door, event.source).inc()
            self.bytes.labels(event.door, event.source).inc(event.size)
            self._peer(event.door, event.source, instances=1, size=event.size, last_instance_at=self.clock())

    def accepted(self, calling_ae: str) -> None:
        """``Receiver(on_accepted=...)``: one association accepted."""
        self.associations.labels(calling_ae).inc()
        self._peer("dimse", calling_ae, associations=1, last_association_at=self.clock())

    def _peer(self, door: str, source: str, *, associations: int = 0, instances: int = 0, size: int = 0,
              last_association_at: float | None = None, last_instance_at: float | None = None) -> None:
        with self._peers_lock:
            p = self._peers.get((door, source)) or PeerActivity(door, source)
            self._peers[(door, source)] = replace(
                p, associations=p.associations + associations, instances=p.instances + instances,
                bytes=p.bytes + size, last_association_at=last_association_at or p.last_association_at,
                last_instance_at=last_instance_at or p.last_instance_at)

    def peers(self) -> list[PeerActivity]:
        """Each sender's activity since the node started, most recently active first."""
        with self._peers_lock:
            rows = list(self._peers.values())
        return sorted(rows, key=lambda p: -max(p.last_association_at or 0, p.last_instance_at or 0))

    def exposition(self) -> bytes:
        """The text exposition format of every metric (scrapes the catalog)."""
        return generate_latest(self.registry)


def _bucket_sums(value: ColumnElement[Any], bounds: Sequence[float]) -> list[ColumnElement[Any]]:
    """count, sum and one cumulative count per bound of ``value`` (SQL aggregates)."""
    return [func.count(value), func.coalesce(func.sum(value), 0.0),
            *(func.sum(case((value <= b, 1), else_=0)) for b in bounds)]


def _histogram_buckets(row: Sequence[Any], bounds: Sequence[float]) -> tuple[list[tuple[str, float]], float]:
    count, total, *cumulative = row
    buckets = [(floatToGoString(b), float(n or 0)) for b, n in zip(bounds, cumulative, strict=True)]
    return [*buckets, ("+Inf", float(count or 0))], float(total or 0.0)


class CatalogCollector(Collector):
    """Metrics read from the catalog at scrape time (a few aggregate queries, no rows loaded)."""

    def __init__(self, settings: Settings, catalog: Catalog, spool: Spool) -> None:
        self.settings = settings
        self.catalog = catalog
        self.spool = spool

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("dicom_node_catalog_up", "1 if the catalog could be read for this scrape")
        try:
            metrics = list(self._from_catalog())
        except Exception:  # a locked or broken catalog must not break the scrape
            log.exception("metrics: cannot read the catalog")
            metrics = []
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
        yield up
        yield from metrics
        try:
            free = self.spool.free_bytes()
        except OSError:
            return
        disk = GaugeMetricFamily("dicom_node_disk_free_bytes", "Free bytes on the storage directory's file system")
        disk.add_metric([], free)
        yield disk

    def _from_catalog(self) -> Iterator[Metric]:
        with self.catalog.reading() as s:  # a read transaction: a scrape never delays a C-STORE
            stages = HistogramMetricFamily("dicom_node_job_stage_seconds",
                                           "Duration of each job stage (load, infer, encode) by model, from the "
                                           "timings workers write to the catalog", labels=["model", "stage"])
            for stage in STAGES:
                column: ColumnElement[Any] = getattr(Job, f"{stage}_seconds")
                rows = s.execute(select(Job.model, *_bucket_sums(column, STAGE_BUCKETS))
                                 .where(column.is_not(None)).group_by(Job.model).order_by(Job.model))
                for model, *row in rows:
                    buckets, total = _histogram_buckets(row, STAGE_BUCKETS)
                    stages.add_metric([model, stage], buckets, total)
            yield stages

            per_study = (
                select(Job.study_id.label("study_id"), func.max(Delivery.sent_at).label("last_sent"),
                       func.sum(case((Delivery.state == DeliveryState.PENDING, 1), else_=0)).label("pending"))
                .select_from(Delivery)
                .join(Result, Result.id == Delivery.result_id)
                .join(Job, Job.id == Result.job_id)
                .group_by(Job.study_id)
                .subquery()
            )
            turnaround = per_study.c.last_sent - Study.last_received_at
            totals = s.execute(
                select(*_bucket_sums(turnaround, TURNAROUND_BUCKETS))
                .select_from(per_study).join(Study, Study.id == per_study.c.study_id)
                .where(per_study.c.pending == 0, per_study.c.last_sent.is_not(None))
            ).one()
            hist = HistogramMetricFamily("dicom_node_study_turnaround_seconds",
                                         "Last instance of a study received -> all its deliveries sent")
            buckets, total = _histogram_buckets(tuple(totals), TURNAROUND_BUCKETS)
            hist.add_metric([], buckets, total)
            yield hist

            jobs = GaugeMetricFamily("dicom_node_jobs", "Jobs in the catalog by model and state",
                                     labels=["model", "state"])
            queued: dict[str, int] = {}
            for model, job_state, n in s.execute(select(Job.model, Job.state, func.count())
                                                 .group_by(Job.model, Job.state)):
                jobs.add_metric([model, str(job_state)], n)
                if job_state == JobState.QUEUED:
                    queue = self.settings.model_settings(model).queue
                    queued[queue] = queued.get(queue, 0) + n
            yield jobs
            depth = GaugeMetricFamily("dicom_node_queue_depth", "Jobs queued in the catalog per worker queue",
                                      labels=["queue"])
            for queue in sorted({"cpu", *(m.queue for m in self.settings.models.values()), *queued}):
                depth.add_metric([queue], queued.get(queue, 0))
            yield depth

            deliveries = GaugeMetricFamily("dicom_node_deliveries", "Deliveries by destination and state",
                                           labels=["destination", "state"])
            for dest, delivery_state, n in s.execute(select(Delivery.destination, Delivery.state, func.count())
                                                     .group_by(Delivery.destination, Delivery.state)):
                deliveries.add_metric([dest, str(delivery_state)], n)
            yield deliveries

            paused = set(s.scalars(select(DestinationState.name).where(DestinationState.paused.is_(True))))
            gauge = GaugeMetricFamily("dicom_node_destination_paused", "1 while a destination is paused",
                                      labels=["destination"])
            for d in self.settings.destinations:
                gauge.add_metric([d.name], 1 if d.name in paused else 0)
            yield gauge
