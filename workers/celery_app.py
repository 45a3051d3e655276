"""The Celery application shared by the node (which only sends) and the workers (which run jobs).

Messages carry a job id and nothing else; the catalog says what to do. Settings that matter:
``acks_late`` + ``reject_on_worker_lost`` (a job whose worker dies is redelivered), prefetch 1
(long jobs are not hoarded), no result backend (results live in the catalog), and a visibility
timeout longer than the longest job for Redis (or Redis redelivers a job still running).

The embedded broker is kombu's ``filesystem://`` transport in ``<storage_dir>/queue``: no server,
messages are files (so they survive a restart), and the worker is the same prefork Celery worker
that runs against Redis, so the embedded default and production share one code path.

Worker processes. ``dicom-node worker`` is Celery's prefork parent: it forks ``concurrency``
children that run the jobs. The parent never imports torch (so it can never initialise CUDA, which
does not survive a fork); models, and with them torch and CUDA, are built lazily in each child on
its first job (``workers.pipeline.WorkerContext.model``). At ``worker_process_init`` each child
caps the threads of torch, SimpleITK and the BLAS/OpenMP pools (:func:`torch_threads`:
``queue.torch_threads`` when the settings have it, else ``OMP_NUM_THREADS``, else the CPUs this
worker may use divided by the concurrency), so N children do not each start one thread per core;
torch is imported there only if installed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init

from node.config import Settings

log = logging.getLogger("workers.celery_app")

TASK_NAME = "dicom_node.run_job"
DEFAULT_QUEUE = "cpu"
"""Queue for CPU models; GPU models get their own queue so GPU workers run with concurrency 1."""


TORCH_THREADS_CONF = "dicom_node_torch_threads"
"""App setting carrying ``queue.torch_threads`` (None: automatic) from the settings to the worker."""
PROC_ALIVE_TIMEOUT_SECONDS = 60.0
"""How long a new pool child may take to start (Celery's default, 4 s, is short for importing torch)."""

_child_torch_threads: int | None = None
"""Set in the prefork parent at ``worker_init``, applied in each child at ``worker_process_init``."""


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def torch_threads(
    cpus: int, concurrency: int, configured: int | None = None, environ: Mapping[str, str] | None = None
) -> int:
    """Intra-op threads for torch in one of ``concurrency`` worker children sharing ``cpus`` CPUs.

    ``configured`` (from the settings) wins; then a positive integer ``OMP_NUM_THREADS`` in
    ``environ``; else ``cpus // concurrency``. Never less than 1.
    """
    if configured is not None:
        return max(1, int(configured))
    omp = (environ or {}).get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return max(1, cpus // max(1, concurrency))


@worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """In the worker's main process, before the pool forks: decide the children's torch threads."""
    global _child_torch_threads
    app = getattr(sender, "app", None)
    if app is None or app.main != "dicom_node":
        return
    if "torch" in sys.modules:  # nothing in the worker's main process imports it; keep it so
        log.warning("torch was imported before the worker pool forked; CUDA must not be initialised here")
    concurrency = getattr(sender, "concurrency", None)
    configured = app.conf.get(TORCH_THREADS_CONF)
    _child_torch_threads = torch_threads(
        available_cpus(), concurrency if isinstance(concurrency, int) else 1, configured, os.environ
    )


@worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    """In each pool child, right after the fork: cap the threads of torch, SimpleITK and the BLAS /
    OpenMP pools numpy and scipy use (each only if installed)."""
    threads = _child_torch_threads
    if threads is None:
        return
    if importlib.util.find_spec("threadpoolctl") is not None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads)  # applies now and stays (not used as a context manager)
    if importlib.util.find_spec("SimpleITK") is not None:
        import SimpleITK

        SimpleITK.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(threads)
    log.info("worker process %d: torch, SimpleITK and BLAS use %d thread(s)", os.getpid(), threads)


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
        "worker_proc_alive_timeout": PROC_ALIVE_TIMEOUT_SECONDS,
        TORCH_THREADS_CONF: settings.queue.torch_threads,  # None: automatic, see torch_threads
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
