"""The catalog's database: engine set-up (SQLite pragmas and write locks; PostgreSQL) and schema
upgrades by Alembic (:mod:`node.migrations`).

:class:`node.catalog.Catalog` builds its engine here; the tables are in :mod:`node.schema`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Connection, Engine

from node.migrations import legacy

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_SECONDS = 60
"""How long a writer waits for the SQLite lock before giving up."""

MIGRATION_LOCK_KEY = 0x44494E4F
"""PostgreSQL advisory lock held while migrating: receivers starting together migrate once."""

_MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN IMMEDIATE ourselves (see make_engine)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # Success on C-STORE means the row is durable
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_SECONDS * 1000}")
    cur.close()


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    """The catalog's engine. SQLite: ``read_only`` transactions begin DEFERRED instead of IMMEDIATE, so
    a long read (a QIDO-RS scan) holds no write lock (WAL: readers and the writer do not block each
    other). PostgreSQL: READ COMMITTED (its MVCC readers never block writers); the places that relied
    on SQLite's database-wide write lock take row locks (``SELECT ... FOR UPDATE``) instead."""
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
    return create_engine(url, pool_pre_ping=True, hide_parameters=True)


def alembic_config(conn: Connection) -> Config:
    """Alembic's configuration for :mod:`node.migrations`, bound to ``conn`` (no alembic.ini)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["connection"] = conn
    return cfg


def upgrade(engine: Engine) -> None:
    """Bring the catalog to the newest revision: an empty database gets every table, a catalog from
    a version before Alembic is brought to the current schema in place (:mod:`node.migrations.legacy`)
    and stamped, a stamped one runs the revisions it lacks. One transaction, under the write lock."""
    with engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
        cfg = alembic_config(conn)
        head = ScriptDirectory.from_config(cfg).get_current_head()
        if legacy.is_legacy(conn):
            added = legacy.to_current(conn)
            log.info("catalog from before schema revisions upgraded in place (%d columns/indexes added), "
                     "stamped %s", len(added), head)
            command.stamp(cfg, "head")
            return
        current = _stamped_revision(conn)
        if current != head:  # the common case, an up-to-date catalog, runs (and logs) nothing
            command.upgrade(cfg, "head")
            log.info("catalog schema upgraded from revision %s to %s", current or "(empty)", head)


def _stamped_revision(conn: Connection) -> str | None:
    """The revision in ``alembic_version`` (None: an empty database), read without Alembic's logging."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()


def catalog_url(storage_dir: Path) -> str:
    """The default catalog: a SQLite file in the storage directory."""
    return f"sqlite:///{storage_dir / 'catalog.sqlite3'}"
