"""A catalog written by an earlier version is upgraded in place (additive columns, retired states)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from node.catalog import Catalog
from node.schema import JobState, StudyState


def _drop_column(db: Path, table: str, column: str) -> None:
    """Make the catalog one from a version before Alembic that lacked ``table.column``."""
    con = sqlite3.connect(db)
    con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    con.execute("DROP TABLE IF EXISTS alembic_version")
    con.commit()
    con.close()


def test_missing_column_is_added_with_its_default(tmp_path: Path) -> None:
    Catalog.for_storage(tmp_path).engine.dispose()
    db = tmp_path / "catalog.sqlite3"
    _drop_column(db, "results", "variant")
    con = sqlite3.connect(db)
    con.execute("INSERT INTO results (job_id, kind, sop_instance_uid, sop_class_uid, path) "
                "VALUES (1, 'SR', '1.2.3', '1.2.840.10008.5.1.4.1.1.88.34', 'r/1.dcm')")
    con.commit()
    con.close()
    catalog = Catalog.for_storage(tmp_path)  # the upgrade happens here
    columns = {row[1]: row for row in sqlite3.connect(db).execute("PRAGMA table_info(results)")}
    assert "variant" in columns
    with catalog.session() as s:
        from node.catalog import Result

        [row] = s.query(Result).all()
        assert row.variant == ""  # the old row got the column's default


def test_a_column_that_cannot_be_added_is_a_clear_error(tmp_path: Path) -> None:
    Catalog.for_storage(tmp_path).engine.dispose()
    _drop_column(tmp_path / "catalog.sqlite3", "results", "path")  # NOT NULL, no default
    with pytest.raises(RuntimeError, match="results lacks column path"):
        Catalog.for_storage(tmp_path)


def test_old_rows_read_back_as_typed_states(tmp_path: Path) -> None:
    """Rows an earlier version wrote (plain strings, JSON text) read back as typed states and parsed
    JSON; a study it left ``awaiting-prior`` (now a job state) is ready again, to be routed anew."""
    Catalog.for_storage(tmp_path).engine.dispose()
    con = sqlite3.connect(tmp_path / "catalog.sqlite3")
    con.execute("DROP TABLE alembic_version")  # written before Alembic
    con.execute("INSERT INTO studies (id, study_uid, state, generation, first_received_at, last_received_at, "
                "instance_count, study_datetime) VALUES (1, '1.2.1', 'awaiting-prior', 1, 0, 0, 1, ''), "
                "(2, '1.2.2', 'routed', 1, 0, 0, 1, '')")
    con.execute("INSERT INTO series (id, series_uid, study_id, attributes, instance_count) "
                """VALUES (1, '1.2.1.1', 1, '{"Modality": "CT"}', 1)""")
    con.execute("INSERT INTO jobs (study_id, series_id, generation, model, rule, destinations, state, attempts, "
                """not_before, created_at, updated_at) VALUES (2, 1, 1, 'm', 'r', '["pacs"]', 'done', 1, 0, 0, 0)""")
    con.commit()
    con.close()
    catalog = Catalog.for_storage(tmp_path)
    assert [s.study_uid for s in catalog.studies_in_state(StudyState.READY)] == ["1.2.1"]
    assert catalog.studies_in_state(StudyState.ROUTED)[0].state is StudyState.ROUTED
    [series] = catalog.series_of_study(1)
    assert series.attributes == {"Modality": "CT"} and series.modality == "CT"
    assert series.routing_attributes == {"Modality": "CT", "NumberOfInstances": 1}
    [job] = catalog.jobs_in_state(JobState.DONE)
    assert job.state is JobState.DONE and job.destinations == ["pacs"]


def test_dicomweb_columns_and_indexes_are_added_to_an_old_catalog(tmp_path: Path) -> None:
    """A catalog from before the DICOMweb origin: its series read back as received (routed, served),
    the query columns and their indexes are created, old rows have no query attributes yet."""
    Catalog.for_storage(tmp_path).engine.dispose()
    db = tmp_path / "catalog.sqlite3"
    con = sqlite3.connect(db)
    for index in ("ix_studies_patient_id", "ix_studies_study_date", "ix_studies_accession_number",
                  "ix_series_origin"):
        con.execute(f"DROP INDEX {index}")
    con.commit()
    con.close()
    for table, column in (("studies", "patient_id"), ("studies", "patient_name"), ("studies", "study_date"),
                          ("studies", "accession_number"), ("studies", "dicom"), ("series", "origin"),
                          ("series", "dicom"), ("instances", "dicom")):
        _drop_column(db, table, column)
    con = sqlite3.connect(db)
    con.execute("INSERT INTO studies (id, study_uid, state, generation, first_received_at, last_received_at, "
                "instance_count, study_datetime) VALUES (1, '1.2.1', 'routed', 1, 0, 0, 1, '')")
    con.execute("INSERT INTO series (id, series_uid, study_id, attributes, instance_count) "
                """VALUES (1, '1.2.1.1', 1, '{"Modality": "CT"}', 1)""")
    con.commit()
    con.close()
    catalog = Catalog.for_storage(tmp_path)
    [series] = catalog.series_of_study(1)  # routing still sees it: origin defaults to received
    assert series.origin == "received" and series.dicom is None
    con = sqlite3.connect(db)
    indexes = {row[1] for row in con.execute("SELECT type, name FROM sqlite_master WHERE type = 'index'")}
    assert {"ix_studies_patient_id", "ix_studies_study_date", "ix_studies_accession_number",
            "ix_series_origin"} <= indexes
    assert con.execute("SELECT patient_id, study_date, dicom FROM studies").fetchall() == [("", "", None)]
    con.close()
