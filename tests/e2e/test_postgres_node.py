"""End to end on PostgreSQL: a node whose catalog is a database on a real PostgreSQL server (its
URL, with a password, only in the environment) receives a phantom study by storescu, runs the model
on its embedded worker and delivers SEG, SR, key images and the PDF to Orthanc, exactly once."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from node.catalog import Catalog
from node.schema import DeliveryState, JobState, StudyState
from testkit.dicom import write_ct_series
from testkit.harness import (
    Orthanc,
    free_port,
    node_config,
    start_node_process,
    stop_process,
    storescu,
    wait_for,
)
from testkit.phantom import make_ct_phantom
from testkit.postgres import PostgresServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PASSWORD = "pg-secret-7f3a"


def test_node_on_postgres_delivers_results_once(tmp_path: Path, pg: PostgresServer,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    url = pg.create_database("node").replace("dicom_node@", f"dicom_node:{PASSWORD}@")
    monkeypatch.setenv("DICOM_NODE__CATALOG__URL", url)  # the node and its worker read it from here
    series_dir = tmp_path / "phantom"
    write_ct_series(make_ct_phantom(n_slices=24, rows=96, cols=96, seed=5), series_dir)
    node_port = free_port()
    orthanc = Orthanc(tmp_path, node_port=node_port).start()
    proc: subprocess.Popen[bytes] | None = None
    try:
        cfg = node_config(tmp_path, node_port=node_port, orthanc=orthanc, quiet_seconds=1.0)
        proc = start_node_process(cfg, "run", "node.log", port=node_port)
        out = storescu(node_port, series_dir)
        assert out.returncode == 0, out.stderr
        catalog = Catalog(url)
        try:
            [study] = wait_for(lambda: catalog.studies_in_state(StudyState.ROUTED), 60, what="study routed")

            def delivered() -> bool:
                deliveries = catalog.counts()["deliveries"]
                return bool(deliveries) and set(deliveries) == {DeliveryState.SENT}

            try:
                wait_for(delivered, 180, interval=0.25, what="deliveries sent")
            except TimeoutError:
                print((tmp_path / "node.log").read_text(errors="replace")[-6000:])
                raise
            assert [j.state for j in catalog.jobs_of_study(study.id)] == [JobState.DONE]
            assert catalog.counts()["instances"]["total"] == 24
        finally:
            catalog.close()
        mods = orthanc.modalities_of_study(study.study_uid)
        assert {m: mods.get(m) for m in ("SEG", "SR", "OT", "DOC")} == {"SEG": 1, "SR": 1, "OT": mods.get("OT"),
                                                                          "DOC": 1}
        assert mods.get("OT", 0) >= 1
        assert not (tmp_path / "node-storage" / "catalog.sqlite3").exists()  # no SQLite catalog on the side
    finally:
        if proc is not None:
            stop_process(proc)
        orthanc.stop()
    log = (tmp_path / "node.log").read_text(errors="replace")
    assert PASSWORD not in log  # the catalog URL's secret is never logged
