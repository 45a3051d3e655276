"""A person opens ``/docs`` in a browser (headless Chromium, Playwright): the browser asks for a
user name and password, the token is the password (HTTP Basic, accepted on the docs only); the page
loads ``/openapi.json`` with those credentials, lists the operations, and its Authorize button sends
the token as a bearer token with the request tried. Chromium is the system's (deploy/install.sh)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.catalog import Catalog
from node.config import parse_settings
from node.http.app import create_app
from node.http.auth import issue_token
from node.http.context import NodeContext
from node.http.server import HttpServer
from node.receive.scp import Receiver
from node.spool import Spool
from tests.viewer.test_ohif import CHROMIUM, CHROMIUM_FLAGS

pytestmark = [pytest.mark.viewer, pytest.mark.timeout(120)]


@pytest.fixture
def docs(tmp_path: Path) -> Iterator[tuple[HttpServer, str]]:
    settings = parse_settings({"node": {"storage_dir": str(tmp_path), "min_free_mb": 0}, "http": {"port": 0}})
    catalog, spool = Catalog.for_storage(tmp_path), Spool(tmp_path)
    ctx = NodeContext(settings, catalog, spool, Receiver(settings, catalog, spool, time.time), time.time,
                      broker_reachable=lambda: True)
    server = HttpServer(create_app(ctx), "127.0.0.1", 0)
    server.start()
    try:
        yield server, issue_token(catalog, "operator")
    finally:
        server.stop()


def test_docs_in_a_browser_with_the_token(docs: tuple[HttpServer, str]) -> None:
    server, token = docs
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"Chromium at {CHROMIUM} missing -- run `bash deploy/install.sh`", pytrace=False)
    from playwright import sync_api

    seen: list[tuple[str, int]] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            context = browser.new_context(http_credentials={"username": "me", "password": token})
            page = context.new_page()
            page.on("response", lambda r: seen.append((r.url.removeprefix(server.url), r.status)))
            page.set_default_timeout(20_000)
            page.goto(server.url + "/docs")
            page.locator(".opblock").first.wait_for()
            assert page.locator(".opblock").count() > 30
            page.locator(".btn.authorize").first.click()
            page.locator(".modal-ux input").first.fill(token)
            page.locator(".modal-ux .btn.authorize").first.click()
            page.locator(".modal-ux .btn-done").first.click()
            op = page.locator("#operations-api-list_studies_api_v1_studies_get")
            op.locator(".opblock-summary").first.click()
            op.locator(".try-out__btn").first.click()
            op.locator(".execute").first.click()
            status = op.locator(".live-responses-table .response .response-col_status").first
            status.wait_for()
            assert status.inner_text().strip().startswith("200")
        finally:
            browser.close()
    assert ("/openapi.json", 200) in seen and ("/api/v1/studies?limit=50&offset=0", 200) in seen, seen
