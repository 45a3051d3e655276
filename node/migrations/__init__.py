"""Alembic migrations of the catalog (SQLite and PostgreSQL); run by :func:`node.db.upgrade`.

``versions/`` holds one revision per schema change, the first (``0001``) equal to the schema of the
last version without Alembic. Catalogs written before Alembic are brought to that point by
:mod:`node.migrations.legacy` and stamped. New revision (from the repository root)::

    .venv/bin/python -m node.migrations "add jobs.priority"
"""
