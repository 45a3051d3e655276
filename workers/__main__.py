"""``python -m workers``: a Celery worker for the node's jobs (what ``dicom-node worker`` starts).

The node starts workers by module and never imports this package; with ``remote:`` the worker reaches
the node through its worker API only (:mod:`workers.remote`). Here the worker-only Celery signals are
connected (:func:`workers.celery_app.connect_worker_signals`), the task is registered on
the node's app (:func:`node.queue.create_app`), and Celery's prefork worker runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from models.errors import ConfigError
from node.checks import check_models
from node.config import check_readable_file, check_secret_file, load_settings
from node.logutil import setup_logging
from node.queue import create_app, worker_queues
from workers.celery_app import connect_worker_signals
from workers.heartbeat import connect_heartbeat
from workers.tasks import register


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m workers", description="Run a Celery worker for the node's jobs.")
    p.add_argument("--config", "-c", required=True, type=Path, help="YAML configuration file")
    p.add_argument("--concurrency", type=int, default=0, help="worker processes (default: from config)")
    p.add_argument("--queues", default="",
                   help="comma-separated queues to consume (default: cpu and every queue named under models:)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        queues = [q for q in args.queues.split(",") if q] or worker_queues(settings)
        check_models(settings, queues=queues)  # the models of these queues must be installed here
        if settings.remote is not None:  # a remote worker: the node's API, never the catalog nor the spool
            check_secret_file("remote.token_file", settings.remote.token_file)
            if settings.remote.ca_file is not None:
                check_readable_file("remote.ca_file", settings.remote.ca_file)
    except ConfigError as exc:
        print(f"dicom-node worker: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.logging.level, "worker")
    connect_worker_signals()
    connect_heartbeat(settings, queues)  # each pool child reports itself in the workers table (or via the API)
    app = create_app(settings)
    register(app, settings)
    concurrency = args.concurrency or settings.queue.worker_concurrency
    app.worker_main(argv=[
        "worker",
        "--pool=prefork",
        f"--concurrency={concurrency}",
        f"--queues={','.join(queues)}",
        f"--loglevel={settings.logging.level}",
        f"--hostname=dicom-node-worker-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
