"""node.http: the app skeleton on a real uvicorn server (loopback): health, readiness, OpenAPI,
offline docs, problem+json errors; the moved ``stow:`` section names its new place."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from models.errors import ConfigError
from node.catalog import Catalog
from node.config import Settings, parse_settings
from node.http.app import create_app
from node.http.context import NodeContext
from node.http.server import HttpServer
from node.receive.scp import Receiver
from node.spool import Spool


def _settings(tmp_path: Path, min_free_mb: int = 0) -> Settings:
    return parse_settings({"node": {"storage_dir": str(tmp_path), "min_free_mb": min_free_mb},
                           "http": {"port": 0}})


def _server(settings: Settings, broker_up: bool = True) -> HttpServer:
    catalog = Catalog.for_storage(settings.node.storage_dir)
    spool = Spool(settings.node.storage_dir)
    ctx = NodeContext(settings, catalog, spool, Receiver(settings, catalog, spool, lambda: 0.0), lambda: 0.0,
                      broker_reachable=lambda: broker_up)
    return HttpServer(create_app(ctx), "127.0.0.1", 0)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[HttpServer]:
    s = _server(_settings(tmp_path))
    s.start()
    yield s
    s.stop()


def test_health_and_readiness(server: HttpServer) -> None:
    assert server.port > 0
    r = httpx.get(f"{server.url}/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = httpx.get(f"{server.url}/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"catalog": True, "spool": True, "broker": True}


@pytest.mark.parametrize("broken", ["broker", "spool"])
def test_not_ready_names_the_failing_check(tmp_path: Path, broken: str) -> None:
    settings = _settings(tmp_path, min_free_mb=2**40 if broken == "spool" else 0)  # a floor no disk meets
    s = _server(settings, broker_up=broken != "broker")
    s.start()
    try:
        r = httpx.get(f"{s.url}/readyz")
    finally:
        s.stop()
    assert r.status_code == 503
    assert {k for k, ok in r.json()["checks"].items() if not ok} == {broken}


def test_errors_are_problem_json(server: HttpServer) -> None:
    r = httpx.get(f"{server.url}/no/such/route")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "not-found" and r.json()["status"] == 404
    r = httpx.post(f"{server.url}/healthz")
    assert r.status_code == 405 and r.json()["code"] == "method-not-allowed"


def test_openapi_and_offline_docs(server: HttpServer) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/readyz" in spec["paths"]
    html = httpx.get(f"{server.url}/docs").text
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", html)
    assert assets and all(a.startswith("/") for a in assets), assets  # nothing from a CDN
    for asset in assets:
        assert httpx.get(f"{server.url}{asset}").status_code == 200, asset


def test_the_stow_section_moved(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"stow: .*http\.port"):
        parse_settings({"node": {"storage_dir": str(tmp_path)}, "stow": {"enabled": True, "port": 8080}})
    assert parse_settings({"node": {"storage_dir": str(tmp_path)}}).http.host == "127.0.0.1"


def test_a_port_in_use_is_a_clear_error(server: HttpServer, tmp_path: Path) -> None:
    other = _server(_settings(tmp_path / "b"))
    other._config.port = server.port  # the first server holds it
    with pytest.raises(OSError, match="in use"):
        other.start(timeout=10)
