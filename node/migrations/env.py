"""Alembic environment: always run on a connection :func:`node.db.upgrade` hands in (its transaction
holds the catalog's write lock, so two processes starting together do not migrate twice)."""

from __future__ import annotations

from alembic import context

from node.schema import Base

_connection = context.config.attributes["connection"]
context.configure(
    connection=_connection,
    target_metadata=Base.metadata,
    render_as_batch=_connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
