"""Catalogs written before Alembic (no ``alembic_version`` table): brought in place to the current
schema once, then stamped, so from then on only revisions change them.

Those versions only ever added tables, nullable or defaulted columns and indexes, so the step is
additive; a column that cannot be added (NOT NULL without a default) is a clear error.
"""

from __future__ import annotations

from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from node.schema import Base


def is_legacy(conn: Connection) -> bool:
    """A catalog with tables but no ``alembic_version`` (written by a version before Alembic)."""
    tables = set(inspect(conn).get_table_names())
    return "studies" in tables and "alembic_version" not in tables


def to_current(conn: Connection) -> list[str]:
    """Create missing tables, columns and indexes and move retired states. Returns what was added."""
    Base.metadata.create_all(conn)
    added = _add_missing_columns(conn) + _add_missing_indexes(conn)
    # A study an earlier version left ``awaiting-prior`` (now a job state) is ready again, routed anew.
    conn.exec_driver_sql("UPDATE studies SET state = 'ready' WHERE state = 'awaiting-prior'")
    return added


def _add_missing_columns(conn: Connection) -> list[str]:
    added: list[str] = []
    inspector = inspect(conn)
    for table in Base.metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            default = getattr(column.default, "arg", None)
            if callable(default) or (default is None and not column.nullable):
                raise RuntimeError(f"catalog table {table.name} lacks column {column.name} and it cannot "
                                   "be added automatically; move the old catalog aside")
            ddl = f"ALTER TABLE {table.name} ADD COLUMN {column.name} {column.type.compile(conn.dialect)}"
            if default is not None:
                ddl += " DEFAULT " + (f"'{default}'" if isinstance(default, str) else repr(default))
            if not column.nullable:
                ddl += " NOT NULL"  # SQLite allows it with the non-NULL default checked above
            conn.exec_driver_sql(ddl)
            added.append(f"{table.name}.{column.name}")
    return added


def _add_missing_indexes(conn: Connection) -> list[str]:
    created: list[str] = []
    inspector = inspect(conn)
    for table in Base.metadata.sorted_tables:
        present = {ix["name"] for ix in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in present:
                index.create(conn)
                created.append(str(index.name))
    return created
