"""The Celery application shared by the node (which only sends) and the workers (which run jobs).

Messages carry a job id and nothing else; the catalog says what to do. Settings that matter:
``acks_late`` + ``reject_on_worker_lost`` (a job whose worker dies is redelivered), prefetch 1
(long jobs are not hoarded), no result backend (results live in the catalog), and a visibility
timeout longer than the longest job for Redis (or Redis redelivers a job still running).

The embedded broker is kombu's ``filesystem://`` transport in ``<storage_dir>/queue``: no server,
messages are files (so they survive a restart), and the worker is the same prefork Celery worker
that runs against Redis, so the embedded default and production share one code path.
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery

from node.config import Settings

TASK_NAME = "dicom_node.run_job"
DEFAULT_QUEUE = "cpu"
"""Queue for CPU models; GPU models get their own queue so GPU workers run with concurrency 1."""


def queue_dir(settings: Settings) -> Path:
    return settings.node.storage_dir / "queue"


def create_app(settings: Settings) -> Celery:
    """A Celery app configured from ``settings``; tasks are registered by ``workers.tasks``."""
    app = Celery("dicom_node", set_as_current=False)
    visibility = settings.queue.job_time_limit_seconds * 2 + 600
    conf: dict[str, object] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_default_queue": DEFAULT_QUEUE,
        "task_time_limit": settings.queue.job_time_limit_seconds + 60,
        "task_soft_time_limit": settings.queue.job_time_limit_seconds,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
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
