"""Fixtures shared by every test directory: a throwaway PostgreSQL server (started once per session,
only when a test asks for it), ``catalog_url``, which runs a catalog test on SQLite and on PostgreSQL, and
``catalog``, a catalog on that URL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from node.catalog import Catalog
from testkit.postgres import PostgresServer, postgres_bin, postgres_server


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    """A PostgreSQL server on 127.0.0.1 (its own port and temp directory); skipped only when the
    server binaries are not installed (CI installs Debian's ``postgresql``)."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL server binaries not installed (/usr/lib/postgresql/*/bin)")
    with postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
def catalog_url(request: pytest.FixtureRequest) -> str | None:
    """``catalog.url`` for a catalog test: None (the SQLite file in the storage directory) or a new
    empty database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("pg")
    return server.create_database()


@pytest.fixture
def catalog(tmp_path: Path, catalog_url: str | None) -> Iterator[Catalog]:
    """A catalog in ``tmp_path`` on SQLite and on PostgreSQL (``catalog_url``): SQL searches, row locks."""
    c = Catalog.for_storage(tmp_path, catalog_url)
    yield c
    c.close()
