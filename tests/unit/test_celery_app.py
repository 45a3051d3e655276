"""node.queue + workers.celery_app: torch thread cap for prefork children, connected only by the worker
entry point; the worker's main process never imports torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from node.config import parse_settings
from node.queue import PROC_ALIVE_TIMEOUT_SECONDS, TORCH_THREADS_CONF, create_app
from workers.celery_app import available_cpus, torch_threads

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("cpus", "concurrency", "configured", "environ", "expected"),
    [
        (16, 1, None, {}, 16),  # one child: every CPU
        (16, 4, None, {}, 4),  # shared out between the children
        (16, 3, None, {}, 5),  # rounded down
        (2, 4, None, {}, 1),  # more children than CPUs: at least one thread
        (1, 1, None, {}, 1),
        (16, 4, 2, {}, 2),  # the setting wins...
        (16, 4, 2, {"OMP_NUM_THREADS": "8"}, 2),  # ...over OMP_NUM_THREADS
        (16, 4, 0, {}, 1),  # never below one
        (16, 4, None, {"OMP_NUM_THREADS": "3"}, 3),  # the operator's OMP_NUM_THREADS
        (16, 4, None, {"OMP_NUM_THREADS": " 6 "}, 6),
        (16, 4, None, {"OMP_NUM_THREADS": "0"}, 4),  # not a usable value: ignored
        (16, 4, None, {"OMP_NUM_THREADS": "auto"}, 4),
        (16, 0, None, {}, 16),  # a nonsensical concurrency counts as one
    ],
)
def test_torch_threads(cpus: int, concurrency: int, configured: int | None, environ: dict[str, str],
                       expected: int) -> None:
    assert torch_threads(cpus, concurrency, configured, environ) == expected


def test_torch_threads_ignores_the_environment_by_default() -> None:
    assert torch_threads(8, 2) == 4


def test_available_cpus() -> None:
    n = available_cpus()
    assert 1 <= n <= (os.cpu_count() or n)


def test_app_settings_for_pool_children(tmp_path: Path) -> None:
    app = create_app(parse_settings({"node": {"storage_dir": str(tmp_path)}}))
    assert app.conf.worker_proc_alive_timeout == PROC_ALIVE_TIMEOUT_SECONDS >= 30  # room to import torch
    assert app.conf.get(TORCH_THREADS_CONF) is None  # automatic


def test_parent_never_imports_torch_and_children_cap_threads(tmp_path: Path) -> None:
    """The worker's main process (app, tasks, worker_init) stays free of torch; a forked child caps
    the threads of torch, SimpleITK and BLAS at worker_process_init. Runs in a fresh interpreter
    (this one may hold torch)."""
    pytest.importorskip("torch")
    code = f"""
import os, sys
from celery.signals import worker_init, worker_process_init
from node.config import parse_settings
from node.queue import create_app
from workers.celery_app import available_cpus, connect_worker_signals, torch_threads
from workers.tasks import register

settings = parse_settings({{"node": {{"storage_dir": {str(tmp_path)!r}}}}})
app = create_app(settings)
register(app, settings)
connect_worker_signals()  # what python -m workers does before Celery starts

class FakeWorkController:  # what Celery passes as worker_init's sender
    concurrency = 2
    def __init__(self, app):
        self.app = app

worker_init.send(sender=FakeWorkController(app))
assert "torch" not in sys.modules, "the parent imported torch"
expected = torch_threads(available_cpus(), 2)
pid = os.fork()
if pid == 0:  # a pool child
    try:
        worker_process_init.send(sender="child")
        import SimpleITK, threadpoolctl, torch
        pools = {{i["internal_api"]: i["num_threads"] for i in threadpoolctl.threadpool_info()}}
        capped = (torch.get_num_threads() == expected
                  and SimpleITK.ProcessObject.GetGlobalDefaultNumberOfThreads() == expected
                  and pools and set(pools.values()) == {{expected}})
        os._exit(0 if capped else 3)
    except BaseException:
        os._exit(4)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, os.waitstatus_to_exitcode(status)
assert "torch" not in sys.modules, "the parent imported torch"
"""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=120)


def test_worker_modules_do_not_import_torch() -> None:
    """What ``dicom-node worker`` imports before forking (CLI, app, tasks, pipeline, registry)."""
    code = (
        "import sys; import node.cli, workers.__main__, workers.celery_app, workers.tasks, workers.pipeline, "
        "models.registry; "
        "assert 'torch' not in sys.modules and 'monai' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_importing_the_worker_modules_connects_no_signal() -> None:
    """Celery signals are connected by the worker entry point only, never as an import side effect."""
    code = (
        "from celery.signals import worker_init, worker_process_init; "
        "import workers.__main__, workers.celery_app, workers.tasks, workers.pipeline; "
        "assert not worker_init.receivers and not worker_process_init.receivers, 'connected at import'; "
        "workers.celery_app.connect_worker_signals(); "
        "assert worker_init.receivers and worker_process_init.receivers"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
