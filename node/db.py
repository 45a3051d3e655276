"""The catalog's database: engine set-up (SQLite pragmas, write locks) and in-place upgrades.

:class:`node.catalog.Catalog` builds its engine here; the tables are in :mod:`node.schema`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine

from node.schema import Base

SQLITE_BUSY_TIMEOUT_SECONDS = 60
"""How long a writer waits for the SQLite lock before giving up."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN IMMEDIATE ourselves (see make_engine)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # Success on C-STORE means the row is durable
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_SECONDS * 1000}")
    cur.close()


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    """The catalog's engine. ``read_only``: transactions begin DEFERRED instead of IMMEDIATE, so a
    long read (a QIDO-RS scan) holds no write lock (WAL: readers and the writer do not block each other)."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
        )
        event.listen(engine, "connect", _sqlite_pragmas)

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            # Take the write lock at BEGIN: no deadlocking read->write upgrades between threads.
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


def add_missing_columns(engine: Engine) -> list[str]:
    """Upgrade a catalog written by an earlier version in place: add the columns it lacks.

    Only additive changes are made this way (a new column must have a scalar default); anything
    else needs a migration of its own. Returns ``table.column`` of each column added.
    """
    added: list[str] = []
    with engine.begin() as conn:
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
                ddl = f"ALTER TABLE {table.name} ADD COLUMN {column.name} {column.type.compile(engine.dialect)}"
                if default is not None:
                    ddl += " DEFAULT " + (f"'{default}'" if isinstance(default, str) else repr(default))
                conn.exec_driver_sql(ddl)
                added.append(f"{table.name}.{column.name}")
    return added


def add_missing_indexes(engine: Engine) -> list[str]:
    """Create the indexes of :mod:`node.schema` an existing catalog lacks (``create_all`` creates
    the indexes of new tables only, not those on columns :func:`add_missing_columns` added).
    Returns the names of the indexes created."""
    created: list[str] = []
    with engine.begin() as conn:
        inspector = inspect(conn)
        for table in Base.metadata.sorted_tables:
            present = {ix["name"] for ix in inspector.get_indexes(table.name)}
            for index in table.indexes:
                if index.name not in present:
                    index.create(conn)
                    created.append(str(index.name))
    return created


def upgrade_states(engine: Engine) -> int:
    """Move states an earlier version wrote and this one no longer has: a study left
    ``awaiting-prior`` (now a job state) is ready again and routed anew. Returns the rows changed."""
    with engine.begin() as conn:
        res = conn.exec_driver_sql("UPDATE studies SET state = 'ready' WHERE state = 'awaiting-prior'")
        return int(res.rowcount)


def catalog_url(storage_dir: Path) -> str:
    return f"sqlite:///{storage_dir / 'catalog.sqlite3'}"
