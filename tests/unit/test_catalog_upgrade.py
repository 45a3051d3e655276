"""A catalog written by an earlier version is upgraded in place (additive columns only)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from node.catalog import Catalog


def _drop_column(db: Path, table: str, column: str) -> None:
    con = sqlite3.connect(db)
    con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
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
