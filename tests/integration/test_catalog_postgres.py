"""The catalog on a real PostgreSQL server (and on SQLite): Alembic migrations from empty and from a
catalog written before Alembic, migrations equal to :mod:`node.schema`, several receivers and workers
sharing one PostgreSQL catalog without duplicate rows or double claims."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, select

from models.errors import ConfigError
from node.catalog import Catalog, JobSpec
from node.config import load_settings
from node.db import alembic_config
from node.policy import JobPolicy
from node.schema import Base, Series, Study, StudyState
from testkit.postgres import PostgresServer


def _schema_state(catalog: Catalog) -> tuple[str | None, str | None, list[Any]]:
    """(stamped revision, newest revision, differences between the database and node.schema)."""
    with catalog.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        head = ScriptDirectory.from_config(alembic_config(conn)).get_current_head()
        return context.get_current_revision(), head, compare_metadata(context, Base.metadata)


def test_migrations_from_empty_match_the_schema(tmp_path: Path, catalog_url: str | None) -> None:
    """``alembic check``: an empty database migrated to head has exactly the tables of node.schema."""
    catalog = Catalog.for_storage(tmp_path, catalog_url)
    try:
        current, head, diff = _schema_state(catalog)
        assert current == head and head is not None
        assert diff == []
        Catalog.for_storage(tmp_path, catalog_url).close()  # a second start migrates nothing
        assert _schema_state(catalog)[0] == head
    finally:
        catalog.close()


def test_catalog_from_before_alembic_is_upgraded_and_stamped(tmp_path: Path) -> None:
    """A SQLite catalog of an earlier version (no alembic_version, columns and a table missing) is
    brought to the schema in place, keeps its rows, and is stamped at head."""
    Catalog.for_storage(tmp_path).close()
    con = sqlite3.connect(tmp_path / "catalog.sqlite3")
    con.execute("INSERT INTO studies (id, study_uid, state, generation, first_received_at, last_received_at, "
                "instance_count, study_datetime) VALUES (1, '1.2.1', 'routed', 1, 0, 0, 1, '')")
    for table, column in (("jobs", "priority"), ("jobs", "started_at"), ("studies", "dicom")):
        con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    con.execute("DROP TABLE destination_state")
    con.execute("DROP TABLE alembic_version")
    con.commit()
    con.close()
    catalog = Catalog.for_storage(tmp_path)
    try:
        current, head, diff = _schema_state(catalog)
        assert (current, diff) == (head, [])
        assert [s.study_uid for s in catalog.studies_in_state(StudyState.ROUTED)] == ["1.2.1"]
    finally:
        catalog.close()


def _threads(n: int, target: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors


def test_receivers_start_together_and_share_one_catalog(pg: PostgresServer) -> None:
    """Four receivers (own engines, as on four hosts) start on one empty database at once (migrated
    once, under an advisory lock), then record overlapping instances of the same studies: one row per
    study and series UID, every instance once, the counts exact."""
    url = pg.create_database()
    receivers: list[Catalog] = [None] * 4  # type: ignore[list-item]

    def start(i: int) -> None:
        receivers[i] = Catalog(url)

    assert _threads(4, start) == []

    def receive(i: int) -> None:
        for n in range(30):  # receivers i and i+1 share a study; each instance is sent twice
            study = f"1.2.{i // 2}"
            receivers[i].record_instance(
                study_uid=study, series_uid=f"{study}.{n % 2}", sop_instance_uid=f"{study}.{n % 2}.{n}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=f"x/{n}", size=1, series_attributes={"Modality": "CT"}, now=float(n))

    try:
        assert _threads(4, receive) == []
        with receivers[0].session() as s:
            assert s.scalar(select(func.count()).select_from(Study)) == 2
            assert s.scalar(select(func.count()).select_from(Series)) == 4
            assert sorted(s.scalars(select(Study.instance_count))) == [30, 30]
            assert sorted(s.scalars(select(Series.instance_count))) == [15, 15, 15, 15]
        assert receivers[0].counts()["instances"]["total"] == 60
    finally:
        for catalog in receivers:
            if catalog is not None:
                catalog.close()


def test_workers_on_two_hosts_claim_a_job_once(pg: PostgresServer) -> None:
    """Eight workers (own engines) claim the same queued job at once: exactly one gets it."""
    url = pg.create_database()
    node = Catalog(url)
    node.record_instance(study_uid="1.2", series_uid="1.2.3", sop_instance_uid="1.2.3.4",
                         sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                         path="x", size=1, series_attributes={"Modality": "CT"}, now=0.0)
    node.mark_quiet_studies_ready(1.0, now=2.0)
    [series] = node.series_of_study(1)
    [job_id] = node.create_jobs(1, 1, [JobSpec(series.id, "m", "r", ("pacs",))], 3.0)
    workers = [Catalog(url) for _ in range(8)]
    barrier, claimed = threading.Barrier(8), []

    def claim(i: int) -> None:
        barrier.wait()
        if workers[i].claim_job(job_id, 4.0, worker=f"host{i}:1", policy=JobPolicy()) is not None:
            claimed.append(i)

    try:
        assert _threads(8, claim) == []
        assert len(claimed) == 1
        job = node.get_job(job_id)
        assert job is not None and job.attempts == 1 and job.worker == f"host{claimed[0]}:1"
    finally:
        for catalog in (node, *workers):
            catalog.close()


def test_catalog_url_comes_from_the_environment_and_is_never_shown(tmp_path: Path, pg: PostgresServer) -> None:
    """``DICOM_NODE__CATALOG__URL`` names the catalog (secrets stay out of the file) and the URL is not
    in the settings' repr; Catalog.for_settings opens it."""
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"node": {"ae_title": "AI-NODE", "port": 11112,
                                               "storage_dir": str(tmp_path / "s")}}))
    url = pg.create_database().replace("dicom_node@", "dicom_node:s3cret-pw@")
    settings = load_settings(config, environ={"DICOM_NODE__CATALOG__URL": url})
    assert settings.catalog.url == url and "s3cret-pw" not in repr(settings)
    catalog = Catalog.for_settings(settings)
    try:
        assert catalog.engine.dialect.name == "postgresql" and catalog.writable()
        assert not (tmp_path / "s" / "catalog.sqlite3").exists()
    finally:
        catalog.close()


def test_commented_catalog_example_is_valid(tmp_path: Path) -> None:
    """The commented ``catalog:`` block of the example configuration parses once uncommented; an
    unsupported database is a configuration error."""
    example = (Path(__file__).resolve().parents[2] / "deploy" / "config.example.yaml").read_text()
    lines = example.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# catalog:"))
    data = yaml.safe_load(example) | yaml.safe_load("\n".join(line[2:] for line in lines[start:start + 2]))
    assert data["catalog"]["url"].startswith("postgresql+psycopg://")
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(data))
    assert load_settings(config, environ={}).catalog.url == data["catalog"]["url"]
    with pytest.raises(ConfigError, match=r"catalog\.url"):
        load_settings(config, environ={"DICOM_NODE__CATALOG__URL": "mysql://db/x"})
