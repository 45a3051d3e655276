"""The dashboard in headless Chromium (Playwright, Debian's /usr/bin/chromium) after an end-to-end run:
storescu -> dicom-node (embedded worker, ct-hu-segmentation) -> PACS (Orthanc) that is down for the
first delivery attempt. A person logs in with an operator token, sees the study with its timeline,
its jobs and its failing deliveries (with the reason), starts the PACS, clicks "Retry now" and sees
the deliveries sent, the results in Orthanc; the operations page shows the worker alive (its
heartbeat), the queue, the peer and the plots. Every request stays on the node's origin (no CDN) and
the page raises no script error. The rule dry run page tests the study, then one of its files.
Screenshots (dashboard-studies.png, dashboard-study.png, dashboard-ops.png, dashboard-rules.png) go
to ``$ARTIFACTS_DIR`` (else ``build/artifacts/``).

The send backoff is 5 minutes here, so only the click can deliver within the test.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from testkit.dicom import write_ct_series
from testkit.harness import (
    SCANNER_AE,
    Orthanc,
    bearer,
    create_token,
    free_port,
    node_config,
    start_node_process,
    stop_process,
    storescu,
    wait_for,
)
from testkit.phantom import make_ct_phantom
from tests.viewer.test_ohif import CHROMIUM, CHROMIUM_FLAGS, artifacts_dir

pytestmark = [pytest.mark.e2e, pytest.mark.viewer, pytest.mark.timeout(240)]

PATIENT_NAME, PATIENT_ID = "Dashwatch^Imelda", "DASH-PID-0815"


@dataclass
class Node:
    workdir: Path
    node_port: int
    url: str
    orthanc: Orthanc
    token: str

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(self.url + path, params=params, headers=bearer(self.token), timeout=30)
        assert r.status_code == 200, (path, r.text)
        return r.json()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("*.log")))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    node_port, http_port = free_port(), free_port()
    orthanc = Orthanc(tmp_path, node_port=node_port)  # not started: the PACS is down at first
    cfg = node_config(tmp_path, node_port=node_port, orthanc=orthanc, quiet_seconds=1.0, http_port=http_port,
                      overrides={"send": {"retry_initial_seconds": 300, "retry_max_seconds": 600}})
    procs: list[subprocess.Popen[bytes]] = [start_node_process(cfg, "run", "node.log", port=node_port)]
    try:
        n = Node(tmp_path, node_port, f"http://127.0.0.1:{http_port}", orthanc, create_token(cfg, "operator"))
        wait_for(lambda: httpx.get(f"{n.url}/healthz", timeout=2).status_code == 200, 60, what="HTTP service")
        yield n
    finally:
        for p in procs:
            stop_process(p)
        orthanc.stop()


def _wait(node: Node, predicate: Any, timeout: float, what: str) -> Any:
    try:
        return wait_for(predicate, timeout, interval=0.25, what=what)
    except (TimeoutError, AssertionError):
        print(node.logs()[-6000:])
        raise


def _require_chromium() -> Any:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"Chromium at {CHROMIUM} missing -- run `bash deploy/install.sh`", pytrace=False)
    from playwright import sync_api

    return sync_api


def test_dashboard_shows_the_run_and_retries_a_failed_delivery(node: Node, tmp_path: Path) -> None:
    sync_api = _require_chromium()
    t0 = time.monotonic()
    phantom = make_ct_phantom(n_slices=12, rows=64, cols=64, pixel_mm=5.0, seed=5)
    files = write_ct_series(phantom, tmp_path / "ct", patient_id=PATIENT_ID, patient_name=PATIENT_NAME,
                            uid_seed="dashboard")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(node.node_port, tmp_path / "ct").returncode == 0

    def failing() -> list[dict[str, Any]] | None:
        items = node.get("/api/v1/deliveries", limit=100)["items"]
        return items if items and all(d["state"] == "pending" and d["attempts"] >= 1 and d["last_error"]
                                      for d in items) else None

    deliveries = _wait(node, failing, 120, "every delivery failed once (PACS down)")
    study_id = deliveries[0]["study_id"]
    print(f"\nresults made, deliveries failing after {time.monotonic() - t0:.1f} s: {len(deliveries)} deliveries, "
          f"reason {deliveries[0]['last_error']!r}")
    node.orthanc.start()  # the PACS is back; the next automatic attempt is minutes away

    outside: list[str] = []
    errors: list[str] = []
    shots = artifacts_dir()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(20_000)
            page.on("request", lambda r: None if r.url.startswith(node.url) else outside.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            page.goto(node.url + "/")
            assert page.url.startswith(node.url + "/login")
            page.fill("#token", node.token)
            page.click("form[action='/login'] button[type=submit]")
            page.wait_for_url(node.url + "/")
            row = page.locator(f"tr.study[data-study='{study_id}']")
            row.wait_for()
            assert row.locator(".stage.done .name", has_text="encoded").count() == 1
            assert row.locator(".dests .stage.failed .name", has_text="pacs").count() == 1
            assert PATIENT_NAME not in page.content() and PATIENT_ID not in page.content()
            page.screenshot(path=str(shots / "dashboard-studies.png"), full_page=True)

            row.locator("a").first.click()
            page.wait_for_url(f"{node.url}/studies/{study_id}")
            assert page.locator("tr.job", has_text="ct-hu-segmentation").locator(".state.done").count() == 1
            pending = page.locator("tr.delivery[data-state='pending']")
            assert pending.count() == len(deliveries)
            assert "pacs" in pending.first.inner_text() and pending.first.locator("td.error").inner_text()
            thumbs = page.locator(".thumbs img")
            assert thumbs.count() >= 1
            thumbs.first.scroll_into_view_if_needed()
            page.wait_for_function("() => [...document.querySelectorAll('.thumbs img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")

            for d in deliveries:  # the table is re-rendered after each action
                button = page.locator(f"tr.delivery[data-delivery='{d['id']}'][data-state='pending'] button.act")
                if button.count() == 0:
                    continue  # sent meanwhile
                page.evaluate("() => { document.getElementById('flash').textContent = ''; }")
                button.click()
                page.wait_for_function("() => document.getElementById('flash').textContent === 'Retry now: done'")
            page.wait_for_function("() => !document.querySelector(\"tr.delivery[data-state='pending']\")",
                                   timeout=30_000)  # the live part refreshes every few seconds
            assert page.locator("tr.delivery .state.sent").count() >= 1
            page.screenshot(path=str(shots / "dashboard-study.png"), full_page=True)

            page.goto(node.url + "/ops")
            page.locator("tr.worker", has_text="alive").first.wait_for()
            assert page.locator("tr.queue[data-queue='cpu']").count() == 1
            assert page.locator("tr.peer", has_text=SCANNER_AE).count() == 1
            assert page.locator("svg.chart").count() == 3
            page.screenshot(path=str(shots / "dashboard-ops.png"), full_page=True)

            page.goto(f"{node.url}/studies/{study_id}")  # the rule dry run, of the study, then of a file
            page.click("text=test rules on this study")
            page.wait_for_url(f"{node.url}/rules?study_id={study_id}")
            page.locator("#rules-result .rule-checks li.matched", has_text="ct").first.wait_for()
            assert "ct-hu-segmentation" in page.locator("#rules-result table.jobs").inner_text()
            page.fill("#rules-study", "")
            page.set_input_files("#rules-file", str(files[0]))
            page.click("#rules-test button[type=submit]")
            page.locator("#rules-result p", has_text="Files:").wait_for()
            assert page.locator("#rules-result .conditions li.held", has_text="Modality").count() >= 1
            page.screenshot(path=str(shots / "dashboard-rules.png"), full_page=True)
        finally:
            browser.close()
    modalities = node.orthanc.modalities_of_study(study_uid)
    assert modalities.get("SEG", 0) >= 1 and modalities.get("SR", 0) >= 1, modalities
    assert all(d["state"] != "pending" for d in node.get("/api/v1/deliveries", limit=100)["items"])
    assert not outside, outside
    assert not errors, errors
    print(f"dashboard test done in {time.monotonic() - t0:.1f} s")
