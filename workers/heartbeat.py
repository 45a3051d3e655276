"""Worker heartbeats: each Celery pool child writes a row of the catalog's ``workers`` table every few
seconds (host, pid, queues, started, last seen, the job it runs, the CUDA device in use), and removes
it when it stops. The dashboard and ``GET /api/v1/workers`` read them (:mod:`node.overview_ops`): a
row not updated for ``queue.worker_lost_seconds`` is a worker lost, and its job runs elsewhere. The
row is written by :func:`node.worker_beats.write_beat`: here directly in the catalog, or, on a remote
worker (``remote:``), through the node's worker API (:class:`workers.remote.NodeClient`).

Started from the worker-only Celery signals (:func:`connect_heartbeat`, called by
:mod:`workers.__main__`): ``worker_process_init`` starts a daemon thread in each child after the fork
(a catalog engine of its own), ``task_prerun``/``task_postrun`` set the current job and wake it,
``worker_process_shutdown`` removes the row. torch is never imported here: the GPU name is read only
when the process already initialised CUDA.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from celery.signals import task_postrun, task_prerun, worker_process_init, worker_process_shutdown

from node.catalog import Catalog
from node.config import Settings
from node.queue import TASK_NAME
from node.worker_beats import Beat, remove_beat, write_beat

log = logging.getLogger("workers.heartbeat")

INTERVAL_SECONDS = 5.0
"""How often a worker process writes its row (lost after ``queue.worker_lost_seconds`` without one)."""


class BeatSink(Protocol):
    """Where heartbeats go: the catalog (:class:`CatalogBeats`) or the node's worker API."""

    def write_beat(self, beat: Beat, now: float) -> None: ...

    def remove_beat(self, host: str, pid: int) -> None: ...

    def close(self) -> None: ...


class CatalogBeats:
    """Heartbeats written straight into the catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def write_beat(self, beat: Beat, now: float) -> None:
        write_beat(self.catalog, beat, now)

    def remove_beat(self, host: str, pid: int) -> None:
        remove_beat(self.catalog, host, pid)

    def close(self) -> None:
        self.catalog.engine.dispose()


def gpu_name() -> str | None:
    """The name of the CUDA device this process uses, if it already initialised CUDA (never imports
    torch, never initialises CUDA)."""
    torch: Any = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_initialized():
            return None
        return str(torch.cuda.get_device_name(torch.cuda.current_device()))
    except Exception:  # a broken CUDA state must not stop the heartbeat
        return None


class Heartbeat:
    """One process's heartbeat thread."""

    def __init__(self, sink: Catalog | BeatSink, queues: Sequence[str], *, interval: float = INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.time, host: str | None = None, pid: int | None = None) -> None:
        self.sink: BeatSink = CatalogBeats(sink) if isinstance(sink, Catalog) else sink
        self.queues = ",".join(queues)
        self.interval = interval
        self.clock = clock
        self.host = host or socket.gethostname()
        self.pid = pid if pid is not None else os.getpid()
        self.started_at = clock()
        self.job_id: int | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Write this process's row now."""
        beat = Beat(self.host, self.pid, self.queues, self.started_at, self.job_id, gpu_name())
        self.sink.write_beat(beat, self.clock())

    def set_job(self, job_id: int | None) -> None:
        """The job this process runs now (None: idle); written at once."""
        self.job_id = job_id
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception as exc:  # a busy or unreachable catalog: try again at the next beat
                log.warning("heartbeat not written: %s", exc)
            self._wake.wait(self.interval)
            self._wake.clear()

    def stop(self) -> None:
        """Stop the thread and remove the row (a clean exit is not a lost worker)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.sink.remove_beat(self.host, self.pid)
        except Exception as exc:
            log.warning("heartbeat row not removed: %s", exc)


class HeartbeatSignals:
    """The Celery signal handlers that run a :class:`Heartbeat` in each pool child."""

    def __init__(self, settings: Settings, queues: Sequence[str], interval: float = INTERVAL_SECONDS) -> None:
        self.settings = settings
        self.queues = list(queues)
        self.interval = interval
        self.heartbeat: Heartbeat | None = None

    def on_process_init(self, **_: Any) -> None:
        """In each pool child, after the fork: its own catalog engine (or node API client) and heartbeat
        thread."""
        remote = self.settings.remote
        if remote is not None:
            from workers.remote import NodeClient  # httpx: only remote workers need it

            sink: BeatSink = NodeClient(remote)
            self.heartbeat = Heartbeat(sink, self.queues, interval=self.interval, host=remote.name or None)
        else:
            self.heartbeat = Heartbeat(Catalog.for_settings(self.settings), self.queues, interval=self.interval)
        self.heartbeat.start()

    def on_task_prerun(self, sender: Any = None, args: Any = None, **_: Any) -> None:
        if self.heartbeat is not None and getattr(sender, "name", None) == TASK_NAME and args:
            try:
                self.heartbeat.set_job(int(args[0]))
            except (TypeError, ValueError):
                return

    def on_task_postrun(self, sender: Any = None, **_: Any) -> None:
        if self.heartbeat is not None and getattr(sender, "name", None) == TASK_NAME:
            self.heartbeat.set_job(None)

    def on_process_shutdown(self, **_: Any) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat.sink.close()
            self.heartbeat = None


def connect_heartbeat(settings: Settings, queues: Sequence[str],
                      interval: float = INTERVAL_SECONDS) -> HeartbeatSignals:
    """Hook the heartbeat to the worker-only Celery signals; called once by the worker entry point."""
    signals = HeartbeatSignals(settings, queues, interval)
    worker_process_init.connect(signals.on_process_init, weak=False)
    task_prerun.connect(signals.on_task_prerun, weak=False)
    task_postrun.connect(signals.on_task_postrun, weak=False)
    worker_process_shutdown.connect(signals.on_process_shutdown, weak=False)
    return signals
