"""Enqueuer: one message per job, carrying only the job id, on the model's queue."""

from pathlib import Path
from typing import Any

from node.catalog import Catalog, JobSpec
from node.config import Settings
from node.enqueue import Enqueuer
from node.queue import TASK_NAME


class FakeApp:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, list[Any], str]] = []
        self.fail = fail

    def send_task(self, name: str, args: list[Any], queue: str) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append((name, args, queue))


def _jobs(catalog: Catalog) -> list[int]:
    catalog.record_instance(study_uid="1.2", series_uid="1.2.3", sop_instance_uid="1.2.3.4",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                            path="x", size=1, series_attributes={"Modality": "CT"}, now=0.0)
    catalog.mark_quiet_studies_ready(1.0)
    [series] = catalog.series_of_study(1)
    specs = [JobSpec(series.id, "cpu-model", "r", ()), JobSpec(series.id, "gpu-model", "r", ())]
    return catalog.create_jobs(1, 1, specs, 0.0)


def test_jobs_go_to_their_models_queue_once(tmp_path: Path) -> None:
    settings = Settings.model_validate({"node": {"storage_dir": str(tmp_path)},
                                        "models": {"gpu-model": {"queue": "gpu", "device": "cuda"}}})
    catalog = Catalog.for_storage(tmp_path)
    cpu_job, gpu_job = _jobs(catalog)
    app = FakeApp()
    enq = Enqueuer(app, catalog, lambda: 5.0, queue_of=lambda m: settings.model_settings(m).queue)  # type: ignore[arg-type]
    assert enq.enqueue_pending() == 2
    assert sorted(app.sent) == [(TASK_NAME, [cpu_job], "cpu"), (TASK_NAME, [gpu_job], "gpu")]
    assert enq.enqueue_pending() == 0  # sent once


def test_broker_down_keeps_jobs_for_later(tmp_path: Path) -> None:
    catalog = Catalog.for_storage(tmp_path)
    _jobs(catalog)
    down = Enqueuer(FakeApp(fail=True), catalog, lambda: 5.0)  # type: ignore[arg-type]
    assert down.enqueue_pending() == 0
    up = FakeApp()
    assert Enqueuer(up, catalog, lambda: 6.0).enqueue_pending() == 2  # type: ignore[arg-type]
