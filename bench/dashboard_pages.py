"""Dashboard pages with a busy catalog: each page's time with 10,000 studies against the same page with 100.

Run by hand from the repository root:  .venv/bin/python -m bench.dashboard_pages [--studies 10000]

Two catalogs are filled with bulk inserts (``testkit.busy_catalog``: a series, a job, two results and
four deliveries per study), the node's HTTP app is served on loopback for each, and every dashboard
page is fetched ``--repeat`` times with one keep-alive client (after one warm-up request that compiles
the templates). Prints one table (``bench.report``): the median per page with ``--studies`` studies,
the reference the same page with 100 studies from the same run, the ratio (how the page grows with
the catalog) and the target: under 1 s. ``/ops`` measures the disk usage at most every
``DISK_SECONDS`` (``node.http.ui.ops``): the median is of the cached case, the warm-up does not
fetch it, so its first fetch, which walks the catalog's unserved result files, is one of the three.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.report import Row, format_table
from node.catalog import Catalog
from node.config import parse_settings
from node.http.app import create_app
from node.http.auth import issue_token
from node.http.context import NodeContext
from node.http.server import HttpServer
from node.receive.scp import Receiver
from node.spool import Spool
from testkit.busy_catalog import fill

PAGES = ("/", "/?model=ct-lung-nodules&page=50", "/failures", "/ops")
SMALL = 100
TARGET_SECONDS = 1.0


def page_times(root: Path, studies: int, repeat: int) -> dict[str, float]:
    """Median seconds per page of a node whose catalog holds ``studies`` studies."""
    settings = parse_settings({
        "node": {"storage_dir": str(root), "min_free_mb": 0}, "http": {"port": 0},
        "destinations": [{"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                         {"name": "web", "type": "dicomweb", "url": "http://127.0.0.1:9/dw"}]})
    catalog, spool = Catalog.for_storage(root), Spool(root)
    fill(catalog, studies)
    ctx = NodeContext(settings, catalog, spool, Receiver(settings, catalog, spool, time.time), time.time,
                      broker_reachable=lambda: True)
    server = HttpServer(create_app(ctx), "127.0.0.1", 0)
    server.start()
    try:
        headers = {"Authorization": f"Bearer {issue_token(catalog, 'viewer')}", "Accept": "text/html"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
            client.get("/?fragment=1").raise_for_status()  # templates compiled on first use
            out: dict[str, float] = {}
            for path in PAGES:
                times = []
                for _ in range(repeat):
                    t = time.perf_counter()
                    client.get(path).raise_for_status()
                    times.append(time.perf_counter() - t)
                out[path] = statistics.median(times)
            return out
    finally:
        server.stop()
        catalog.close()


def rows(studies: int = 10_000, repeat: int = 3) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        small = page_times(Path(tmp) / "small", SMALL, repeat)
        big = page_times(Path(tmp) / "big", studies, repeat)
    return [Row(f"Dashboard GET {path}, {studies} studies", big[path], "s", f"same page, {SMALL} studies",
                small[path], target=TARGET_SECONDS, higher_is_better=False, target_on_value=True)
            for path in PAGES]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(format_table(rows(args.studies, args.repeat)))


if __name__ == "__main__":
    main()
