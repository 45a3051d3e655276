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
from node.http.auth import issue_token
from node.http.context import NodeContext
from node.http.server import HttpServer
from node.receive.scp import Receiver
from node.spool import Spool
from tests.httpkit import bearer


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


def test_openapi_and_offline_docs(server: HttpServer, tmp_path: Path) -> None:
    auth = bearer(issue_token(Catalog.for_storage(tmp_path), "viewer"))
    spec = httpx.get(f"{server.url}/openapi.json", headers=auth).json()
    assert spec["openapi"].startswith("3.") and "/readyz" in spec["paths"]
    # Swagger's Authorize button: every protected operation names the bearer scheme
    scheme = spec["components"]["securitySchemes"]["HTTPBearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert spec["paths"]["/api/v1/studies"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in spec["paths"]["/readyz"]["get"]
    html = httpx.get(f"{server.url}/docs", headers=auth).text
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", html)
    assert assets and all(a.startswith("/") for a in assets), assets  # nothing from a CDN
    for asset in assets:
        assert httpx.get(f"{server.url}{asset}", headers=auth).status_code == 200, asset
    assert httpx.get(f"{server.url}/docs/assets/../../etc/passwd", headers=auth).status_code == 404


def test_a_browser_opens_the_docs_with_the_token_as_basic_password(server: HttpServer, tmp_path: Path) -> None:
    token = issue_token(Catalog.for_storage(tmp_path), "viewer")
    r = httpx.get(f"{server.url}/docs")
    assert r.status_code == 401  # the browser asks for a user name and password (Basic first)
    assert r.headers.get_list("www-authenticate")[0].startswith("Basic ")
    assert any(c.startswith("Bearer ") for c in r.headers.get_list("www-authenticate"))
    assert httpx.get(f"{server.url}/docs", auth=("anyone", token)).status_code == 200
    assert httpx.get(f"{server.url}/openapi.json", auth=("anyone", token)).status_code == 200
    assert httpx.get(f"{server.url}/docs", auth=("anyone", "wrong")).status_code == 401
    # Basic is for the docs only: the API wants the bearer token
    r = httpx.get(f"{server.url}/api/v1/studies", auth=("anyone", token))
    assert r.status_code == 401 and r.headers.get_list("www-authenticate") == ['Bearer realm="dicom-node"']


def test_the_stow_section_moved(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"stow: .*http\.port"):
        parse_settings({"node": {"storage_dir": str(tmp_path)}, "stow": {"enabled": True, "port": 8080}})
    assert parse_settings({"node": {"storage_dir": str(tmp_path)}}).http.host == "127.0.0.1"


def test_a_port_in_use_is_a_clear_error(server: HttpServer, tmp_path: Path) -> None:
    other = _server(_settings(tmp_path / "b"))
    other._config.port = server.port  # the first server holds it
    with pytest.raises(OSError, match="in use"):
        other.start(timeout=10)
