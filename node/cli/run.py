"""``dicom-node run`` (the whole node) and ``dicom-node worker`` (a Celery worker for an external broker)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from node.cli.common import PANEL_RUN, ConfigOption, checked_settings
from node.logutil import setup_logging
from node.version import software_version

log = logging.getLogger("node.cli")

WORKER_RESTART_DELAY_SECONDS = 5.0
"""How long ``run`` waits before restarting an embedded worker that exited."""


class WorkerSupervisor:
    """Starts a worker process (``python -m workers``) and restarts it if it dies."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        from node.queue import worker_command

        return subprocess.Popen(worker_command(self.config), start_new_session=False)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.proc = self._spawn()
            log.info("embedded worker started (pid %d)", self.proc.pid)
            rc = self.proc.wait()
            if self._stop.is_set():
                return
            log.error("embedded worker exited with %s; restarting in %.0f s", rc, WORKER_RESTART_DELAY_SECONDS)
            self._stop.wait(WORKER_RESTART_DELAY_SECONDS)

    def stop(self) -> None:
        self._stop.set()
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)  # Celery warm shutdown: the running job finishes or is redelivered
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._thread.join(timeout=5)


def run(config: ConfigOption) -> int:
    """Run the whole node (receiver, HTTP service, router, sender, workers).

    Starts the DICOM receiver, the HTTP service (dashboard, DICOMweb, REST API), assembler, router,
    sender, storage lifecycle and, with queue.embedded_workers, its own worker processes. Stops cleanly
    on SIGTERM or Ctrl-C.
    """
    settings = checked_settings(config, node_files=True)
    setup_logging(settings.logging.level, "node")
    from node.service import NodeService

    service = NodeService(settings)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    supervisor = None
    if settings.queue.embedded_workers:
        supervisor = WorkerSupervisor(Path(config).resolve())
        supervisor.start()
    service.start()
    broker = "embedded file-system broker" if settings.embedded_broker else "external broker"
    log.info("dicom-node %s running (%s, storage %s)", software_version(), broker, settings.node.storage_dir)
    while not stop.wait(1.0):
        pass
    service.stop()
    if supervisor is not None:
        supervisor.stop()
    log.info("stopped")
    return 0


def worker(
    config: ConfigOption,
    concurrency: Annotated[int, typer.Option(help="worker processes (0: queue.worker_concurrency)")] = 0,
    queues: Annotated[str, typer.Option(
        help="comma-separated queues to consume (default: cpu and every queue named under models:); "
        "a GPU machine runs --queues gpu --concurrency 1 per GPU")] = "",
) -> int:
    """Run a Celery worker (for queue.broker_url = redis://...).

    The embedded broker's workers are started by run. Becomes python -m workers (same process id, so a
    supervisor's signals reach it).
    """
    from node.queue import worker_command  # celery

    checked_settings(config)  # refuse a bad configuration here, with the CLI's message and exit code
    cmd = worker_command(Path(config), concurrency=concurrency, queues=queues)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel=PANEL_RUN)(run)
    app.command(rich_help_panel=PANEL_RUN)(worker)
