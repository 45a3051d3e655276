"""A busy catalog for scale tests and benchmarks of the dashboard: :data:`N` studies, each with a
series, a job, two results and four deliveries (every 97th job failed, every fifth study's web
deliveries pending), written with bulk inserts."""

from __future__ import annotations

from sqlalchemy import insert

from node.catalog import Catalog
from node.schema import Delivery, DeliveryState, Job, JobState, Result, Series, Study, StudyState

N = 10_000
T0 = 1_700_000_000.0
"""The first study's time; study ``i`` arrives 60 s after study ``i - 1``."""


def fill(catalog: Catalog, n: int = N) -> None:
    """Fill an empty ``catalog`` with ``n`` studies (ids 1..n)."""
    studies, series, jobs, results, deliveries = [], [], [], [], []
    for i in range(1, n + 1):
        t = T0 + 60.0 * i
        studies.append({"id": i, "study_uid": f"2.25.{i}", "state": StudyState.ROUTED, "generation": 1,
                        "first_received_at": t, "last_received_at": t + 20, "instance_count": 100,
                        "ready_at": t + 80, "routed_at": t + 81})
        series.append({"id": i, "series_uid": f"2.25.{i}.1", "study_id": i, "attributes": {"Modality": "CT"},
                       "instance_count": 100})
        model = "ct-hu-segmentation" if i % 2 else "ct-lung-nodules"
        failed = i % 97 == 0
        jobs.append({"id": i, "study_id": i, "series_id": i, "generation": 1, "model": model, "rule": "ct",
                     "destinations": ["pacs", "web"], "state": JobState.FAILED if failed else JobState.DONE,
                     "attempts": 1, "created_at": t + 81, "updated_at": t + 95, "first_enqueued_at": t + 82,
                     "started_at": t + 83, "finished_at": t + 95, "error": "ModelError: x" if failed else None})
        if failed:
            continue
        for k, kind in enumerate(("SEG", "SR")):
            rid = 2 * i + k
            results.append({"id": rid, "job_id": i, "kind": kind, "sop_instance_uid": f"2.25.{i}.9.{k}",
                            "sop_class_uid": "1.2", "path": f"results/{i}/{k}.dcm"})
            for dest in ("pacs", "web"):
                sent = dest == "pacs" or i % 5
                deliveries.append({"result_id": rid, "destination": dest, "attempts": 1,
                                   "state": DeliveryState.SENT if sent else DeliveryState.PENDING,
                                   "sent_at": t + 100 if sent else None, "first_attempt_at": t + 96,
                                   "last_error": None if sent else "connection refused"})
    with catalog.session() as s:
        for table, rows in ((Study, studies), (Series, series), (Job, jobs), (Result, results),
                            (Delivery, deliveries)):
            s.execute(insert(table), rows)
