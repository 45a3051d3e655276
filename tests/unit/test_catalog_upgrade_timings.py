"""A catalog written before the per-hop timing columns and the destination_state table is upgraded in
place: the columns are added (NULL in old rows), the table created, and the readers cope."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from node.catalog import Catalog, JobSpec, ResultFile
from node.schema import DestinationState

NEW_COLUMNS = {
    "studies": ("ready_at", "routed_at"),
    "jobs": ("first_enqueued_at", "started_at", "finished_at", "load_seconds", "infer_seconds", "encode_seconds",
             "model_version"),
    "deliveries": ("first_attempt_at",),
}


def test_old_catalog_gets_the_timing_columns_and_the_destination_table(tmp_path: Path) -> None:
    catalog = Catalog.for_storage(tmp_path)
    catalog.record_instance(study_uid="1.2", series_uid="1.2.3", sop_instance_uid="1.2.3.4",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                            path="x", size=1, series_attributes={"Modality": "CT"}, now=0.0)
    catalog.mark_quiet_studies_ready(1.0, now=2.0)
    [series] = catalog.series_of_study(1)
    [job] = catalog.create_jobs(1, 1, [JobSpec(series.id, "m", "r", ("pacs",))], 3.0)
    catalog.record_results(job, [ResultFile("SR", "1.9", "1.2.840.10008.5.1.4.1.1.88.34", "r/1.dcm")], ["pacs"], 4.0)
    catalog.engine.dispose()
    db = tmp_path / "catalog.sqlite3"
    con = sqlite3.connect(db)
    for table, columns in NEW_COLUMNS.items():
        for column in columns:
            con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    con.execute(f"DROP TABLE {DestinationState.__tablename__}")
    con.execute("DROP TABLE alembic_version")  # written before Alembic
    con.commit()
    con.close()

    catalog = Catalog.for_storage(tmp_path)  # the upgrade happens here
    con = sqlite3.connect(db)
    for table, columns in NEW_COLUMNS.items():
        present = {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
        assert set(columns) <= present, table
    con.close()
    study, job_row, delivery = catalog.get_study(1), catalog.get_job(job), catalog.get_delivery(1)
    assert study is not None and (study.ready_at, study.routed_at) == (None, None)
    assert job_row is not None and job_row.started_at is None and job_row.model_version is None
    assert delivery is not None and delivery.first_attempt_at is None
    assert catalog.paused_destinations() == set()
    catalog.set_destination_paused("pacs", True, 5.0)
    assert catalog.paused_destinations() == {"pacs"}
    assert catalog.due_deliveries(10.0, skip_paused=True) == []
