"""The queue contract between the node (which only sends) and the workers (which run jobs).

The node imports this module, never ``workers``: task name, queue names and the Celery app
configuration live here; ``workers`` registers the task on the app and starts the worker process
(``python -m workers``). Messages carry a job id and nothing else; the catalog says what to do.

Settings that matter: ``acks_late`` + ``reject_on_worker_lost`` (a job whose worker dies is
redelivered), prefetch 1 (long jobs are not hoarded), no result backend (results live in the
catalog), and a visibility timeout longer than the longest job for Redis (or Redis redelivers a job
still running).

The embedded broker is kombu's ``filesystem://`` transport in ``<storage_dir>/queue``: no server,
messages are files (so they survive a restart), and the worker is the same prefork Celery worker
that runs against Redis, so the embedded default and production share one code path.
"""

from __future__ import annotations

import sys
from pathlib import Path

from celery import Celery

from node.config import Settings

APP_NAME = "dicom_node"
TASK_NAME = "dicom_node.run_job"
DEFAULT_QUEUE = "cpu"
"""Queue for CPU models; GPU models get their own queue so GPU workers run with concurrency 1."""
WORKER_MODULE = "workers"
"""What ``python -m`` runs to start a worker: the node starts workers by module, it never imports them."""

TORCH_THREADS_CONF = "dicom_node_torch_threads"
"""App setting carrying ``queue.torch_threads`` (None: automatic) from the settings to the worker."""
PROC_ALIVE_TIMEOUT_SECONDS = 60.0
"""How long a new pool child may take to start (Celery's default, 4 s, is short for importing torch)."""
HARD_LIMIT_GRACE_SECONDS = 60
"""After its soft time limit a job has this long to end before its pool child is killed."""


def model_time_limit(settings: Settings, model: str) -> int:
    """Soft time limit of a job of ``model``: ``models.<model>.time_limit_seconds``, else
    ``queue.job_time_limit_seconds``. Sent with each message (:mod:`node.enqueue`); the worker
    enforces it (``SoftTimeLimitExceeded`` in the job, the pool child killed after the grace)."""
    return settings.model_settings(model).time_limit_seconds or settings.queue.job_time_limit_seconds


def longest_time_limit(settings: Settings) -> int:
    """The longest soft time limit of any job (leases and the broker's visibility timeout exceed it)."""
    return max([settings.queue.job_time_limit_seconds,
                *(m.time_limit_seconds for m in settings.models.values() if m.time_limit_seconds)])


def queue_dir(settings: Settings) -> Path:
    return settings.node.storage_dir / "queue"


def worker_queues(settings: Settings) -> list[str]:
    """The queues a worker consumes by default: ``cpu`` and every queue named under ``models:``."""
    return sorted({DEFAULT_QUEUE, *(m.queue for m in settings.models.values())})


def worker_command(config: Path, *, concurrency: int = 0, queues: str = "") -> list[str]:
    """The command line that starts a worker process for the configuration file ``config``."""
    cmd = [sys.executable, "-m", WORKER_MODULE, "--config", str(config)]
    if concurrency:
        cmd += ["--concurrency", str(concurrency)]
    if queues:
        cmd += ["--queues", queues]
    return cmd


def create_app(settings: Settings) -> Celery:
    """A Celery app configured from ``settings``; the workers register the task on it."""
    app = Celery(APP_NAME, set_as_current=False)
    visibility = longest_time_limit(settings) * 2 + 600
    conf: dict[str, object] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_default_queue": DEFAULT_QUEUE,
        "task_time_limit": settings.queue.job_time_limit_seconds + HARD_LIMIT_GRACE_SECONDS,
        "task_soft_time_limit": settings.queue.job_time_limit_seconds,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_proc_alive_timeout": PROC_ALIVE_TIMEOUT_SECONDS,
        TORCH_THREADS_CONF: settings.queue.torch_threads,  # None: automatic (workers.celery_app)
    }
    if settings.embedded_broker:
        q = queue_dir(settings)
        for sub in ("messages", "control"):
            (q / sub).mkdir(parents=True, exist_ok=True)
        conf.update(
            broker_url="filesystem://",
            broker_transport_options={
                "data_folder_in": str(q / "messages"),
                "data_folder_out": str(q / "messages"),
                "control_folder": str(q / "control"),  # exchange bindings; default is ./control
                "store_processed": False,
                "polling_interval": settings.queue.poll_seconds,
            },
            worker_enable_remote_control=False,  # the file-system transport has no fan-out
        )
    else:
        conf.update(
            broker_url=settings.queue.broker_url,
            broker_transport_options={"visibility_timeout": visibility},
        )
    app.conf.update(conf)
    return app


def broker_reachable(app: Celery, timeout: float = 2.0) -> bool:
    """Whether the broker accepts a connection within ``timeout`` seconds (``/readyz``)."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
    except Exception:  # kombu raises the transport's own errors; any of them means "not reachable"
        return False
    return True
