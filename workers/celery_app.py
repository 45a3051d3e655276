"""The worker side of Celery: thread caps for the pool children, connected explicitly.

The app itself (task name, queues, broker configuration) is the node's queue contract,
:mod:`node.queue`; :mod:`workers.tasks` registers the task on it and :mod:`workers.__main__` starts
the worker. Nothing here acts at import: :func:`connect_worker_signals` hooks the Celery signals, and
only the worker entry point calls it.

Worker processes. ``python -m workers`` is Celery's prefork parent: it forks ``concurrency``
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
from typing import Any

from celery.signals import worker_init, worker_process_init

from node.queue import APP_NAME, TORCH_THREADS_CONF

log = logging.getLogger("workers.celery_app")


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


class ThreadCap:
    """Decides the children's thread count in the prefork parent and applies it in each child."""

    def __init__(self) -> None:
        self.threads: int | None = None
        """Set in the parent at ``worker_init``; inherited by each child through the fork."""

    def on_worker_init(self, sender: Any = None, **_: Any) -> None:
        """In the worker's main process, before the pool forks: decide the children's threads."""
        app = getattr(sender, "app", None)
        if app is None or app.main != APP_NAME:
            return
        if "torch" in sys.modules:  # nothing in the worker's main process imports it; keep it so
            log.warning("torch was imported before the worker pool forked; CUDA must not be initialised here")
        concurrency = getattr(sender, "concurrency", None)
        configured = app.conf.get(TORCH_THREADS_CONF)
        self.threads = torch_threads(
            available_cpus(), concurrency if isinstance(concurrency, int) else 1, configured, os.environ
        )

    def on_process_init(self, **_: Any) -> None:
        """In each pool child, right after the fork: cap the threads of torch, SimpleITK and the BLAS /
        OpenMP pools numpy and scipy use (each only if installed)."""
        threads = self.threads
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


def connect_worker_signals() -> ThreadCap:
    """Hook the worker-only Celery signals (thread caps); called once by the worker entry point."""
    cap = ThreadCap()
    worker_init.connect(cap.on_worker_init, weak=False)
    worker_process_init.connect(cap.on_process_init, weak=False)
    return cap
