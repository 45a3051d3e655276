"""The dashboard stays usable with 10,000 studies: a catalog filled with bulk inserts (10,000 studies,
each with a series, a job, two results and four deliveries), then each page query and the whole
studies page over HTTP. Each must give the right answer with a number of SQL statements that does not
grow with the catalog (no query per row: the N+1 pattern that makes a page slow at scale); the time of
each is printed. Speed itself is not asserted here (a wall-clock limit fails on a busy CI machine, and
speed targets live in bench/)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import event

from node.catalog import Catalog
from node.config import parse_settings
from node.http.app import create_app
from node.http.auth import issue_token
from node.http.context import NodeContext
from node.http.server import HttpServer
from node.overview import study_page
from node.overview_ops import destination_states, hourly_stats
from node.receive.scp import Receiver
from node.schema import StudyState
from node.spool import Spool
from testkit.busy_catalog import T0, N, fill
from tests.httpkit import bearer

MAX_STATEMENTS = 40
"""Per page or query, whatever the catalog holds (a query per study shown would be 50 or more)."""


class Statements:
    """Counts the SQL statements the catalog's engines (writer and reader) execute."""

    def __init__(self, catalog: Catalog) -> None:
        self.count = 0
        self.engines = [catalog.engine, catalog._read_sessions.kw["bind"]]
        for engine in self.engines:
            event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, *_: Any) -> None:
        self.count += 1


def _timed(statements: Statements, what: str, call: Callable[[], Any]) -> Any:
    before = statements.count
    t = time.perf_counter()
    out = call()
    seconds = time.perf_counter() - t
    n = statements.count - before
    print(f"{what}: {seconds * 1000:.1f} ms, {n} SQL statements")
    assert n <= MAX_STATEMENTS, f"{what} ran {n} SQL statements for one page"
    return out


def test_ten_thousand_studies_page_quickly(tmp_path: Path) -> None:
    settings = parse_settings({"node": {"storage_dir": str(tmp_path), "min_free_mb": 0}, "http": {"port": 0},
                               "destinations": [{"name": "pacs", "type": "dimse", "ae_title": "PACS",
                                                 "host": "127.0.0.1", "port": 104},
                                                {"name": "web", "type": "dicomweb", "url": "http://127.0.0.1:9/dw"}]})
    catalog, spool = Catalog.for_storage(tmp_path), Spool(tmp_path)
    t = time.perf_counter()
    fill(catalog)
    print(f"\nfilled {N} studies in {time.perf_counter() - t:.1f} s")
    sql = Statements(catalog)
    total, rows = _timed(sql, "first page", lambda: study_page(catalog, state=None, limit=50, offset=0))
    assert total == N and rows[0].study.id == N and rows[0].delivered_at is None  # its web deliveries pend
    assert rows[1].delivered_at is not None
    total, rows = _timed(sql, "last page", lambda: study_page(catalog, state=None, limit=50, offset=N - 50))
    assert rows[-1].study.id == 1
    total, rows = _timed(sql, "by model", lambda: study_page(catalog, state=None, model="ct-lung-nodules", limit=50,
                                                        offset=0))
    assert total == N // 2 and all(f.study.id % 2 == 0 for f in rows)
    total, _ = _timed(sql, "by destination", lambda: study_page(catalog, state=None, destination="web", limit=50,
                                                           offset=0))
    assert total == N - N // 97
    day = T0 + 60.0 * 5000
    total, _ = _timed(sql, "by date", lambda: study_page(catalog, state=StudyState.ROUTED, since=day, until=day + 3600,
                                                    limit=50, offset=0))
    assert total == 60
    states = _timed(sql, "deliveries per destination of a page",
                    lambda: destination_states(catalog, [f.study.id for f in rows]))
    assert set(states[rows[0].study.id]) == {"pacs", "web"}
    hours = _timed(sql, "24 h stats", lambda: hourly_stats(catalog, T0 + 60.0 * N + 200, 24))
    assert sum(h.studies for h in hours) > 0

    ctx = NodeContext(settings, catalog, spool, Receiver(settings, catalog, spool, time.time), time.time,
                      broker_reachable=lambda: True)
    server = HttpServer(create_app(ctx), "127.0.0.1", 0)
    server.start()
    try:
        headers = {**bearer(issue_token(catalog, "viewer")), "Accept": "text/html"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as c:
            c.get("/?fragment=1")  # warm up (templates compiled on first use)
            for path in ("/", "/?model=ct-lung-nodules&page=50", "/failures", "/ops"):
                r = _timed(sql, f"GET {path}", functools.partial(c.get, path))
                assert r.status_code == 200
    finally:
        server.stop()
        catalog.engine.dispose()
