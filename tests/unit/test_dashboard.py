"""The web dashboard (real uvicorn on loopback, real SQLite catalog; tests/unit/api_helpers.py): login
with a token into an HttpOnly SameSite=Strict cookie, the redirect of a browser without a session,
CSRF protection of cookie-authenticated actions, the studies list with its timelines and filters, a
study page, the failures page with actions for operators only, the live fragments, no patient data."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from node.http.auth import SESSION_COOKIE
from node.http.ui.public import safe_next
from node.http.ui.svg import Line, line_chart
from node.policy import JobPolicy
from node.roles import Role
from node.schema import JobState
from node.tokens import revoke_token
from tests.unit.api_helpers import PHI, ApiNode, api_node

HTML = {"Accept": "text/html"}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[ApiNode]:
    with api_node(tmp_path) as n:
        yield n


@contextmanager
def _login(node: ApiNode, role: Role = Role.OPERATOR) -> Iterator[httpx.Client]:
    """A client holding a session cookie of ``role``'s token (as a browser would after /login)."""
    with httpx.Client(base_url=node.server.url, timeout=10) as client:
        r = client.post("/login", data={"token": node.tokens[role], "next": "/failures"})
        assert r.status_code == 303 and r.headers["location"] == "/failures", r.text
        yield client


def test_a_browser_without_a_session_goes_to_login_and_an_api_client_gets_401(node: ApiNode) -> None:
    with httpx.Client(base_url=node.server.url, timeout=10) as c:
        r = c.get("/studies/1?fragment=1", headers=HTML)
        assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fstudies%2F1%3Ffragment%3D1"
        r = c.get("/")
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        forged = httpx.get(node.server.url + "/api/v1/studies", headers={"Cookie": f"{SESSION_COOKIE}=dnt_forged"})
        assert forged.status_code == 401
        r = c.get("/login", params={"next": "/ops"})
        assert r.status_code == 200 and 'name="token"' in r.text and 'value="/ops"' in r.text
        assert c.get("/ui/static/dashboard.js").headers["content-type"].startswith("text/javascript")
        assert c.get("/ui/static/..%2Fpages.py").status_code == 404


def test_login_sets_a_strict_httponly_cookie_and_logout_clears_it(node: ApiNode) -> None:
    with httpx.Client(base_url=node.server.url, timeout=10) as c:
        r = c.post("/login", data={"token": "dnt_not-a-token"})
        assert r.status_code == 401 and "not valid" in r.text and SESSION_COOKIE not in r.headers.get("set-cookie", "")
        r = c.post("/login", data={"token": node.tokens[Role.SENDER]})
        assert r.status_code == 403 and "may not open the dashboard" in r.text
        r = c.post("/login", data={"token": node.tokens[Role.VIEWER], "next": "https://evil.example/"},
                   headers={"Origin": node.server.url})
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"{SESSION_COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert "Secure" not in cookie  # plain HTTP on loopback; over HTTPS the cookie is Secure
        assert c.get("/", headers=HTML).status_code == 200
        assert c.get("/api/v1/studies").status_code == 200  # the API takes the session too
        r = c.post("/logout", headers={"Origin": node.server.url})
        assert r.status_code == 303 and 'dicom_node_session=""' in r.headers["set-cookie"]
        assert c.get("/", headers=HTML).status_code == 303
        r = c.post("/login", data={"token": node.tokens[Role.ADMIN]}, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and r.json()["code"] == "csrf"


def test_a_revoked_token_ends_the_session(node: ApiNode) -> None:
    with _login(node, Role.VIEWER) as c:
        assert c.get("/", headers=HTML).status_code == 200
        assert revoke_token(node.catalog, "viewer-1", time.time())
        assert c.get("/", headers=HTML).headers["location"] == "/login?next=%2F"


def test_cookie_actions_need_this_origin(node: ApiNode) -> None:
    node.catalog.delivery_failed(1, "connection refused", next_attempt_at=900.0, now=140.0)
    with _login(node) as c:
        r = c.post("/api/v1/deliveries/1/retry")
        assert r.status_code == 403 and r.json()["code"] == "csrf"
        r = c.post("/api/v1/deliveries/1/retry", headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and r.json()["code"] == "csrf"
        r = c.post("/api/v1/deliveries/1/retry", headers={"Referer": "http://evil.example/failures"})
        assert r.status_code == 403
        r = c.post("/api/v1/deliveries/1/retry", headers={"Origin": node.server.url})
        assert r.status_code == 200 and r.json()["next_attempt_at"] == node.now[0]
        r = c.post("/api/v1/deliveries/1/retry", headers={"Referer": node.server.url + "/failures"})
        assert r.status_code == 200
    with _login(node, Role.VIEWER) as c:  # a viewer's session may look, not act
        r = c.post("/api/v1/deliveries/1/retry", headers={"Origin": node.server.url})
        assert r.status_code == 403 and r.json()["code"] == "forbidden"


def test_studies_list_shows_timelines_and_filters(node: ApiNode) -> None:
    with _login(node) as c:
        page = c.get("/", headers=HTML)
        assert page.status_code == 200
        assert page.headers["cache-control"] == "no-store" and "script-src 'self'" in page.headers[
            "content-security-policy"]
        text = page.text
        assert re.findall(r'data-study="(\d+)"', text) == ["2", str(node.study_id)]
        row = text[text.index(f'data-study="{node.study_id}"'):]
        for stage in ("received", "ready", "routed", "queued", "running", "encoded"):
            assert f'<span class="name">{stage}</span>' in row
        assert 'class="stage done" title="encoded' in row
        assert '<span class="name">pacs</span> <span class="at">0/2</span>' in row  # deliveries pending
        for name in PHI:
            assert name not in text

        def shown(**params: str) -> list[str]:
            r = c.get("/", params={"fragment": "1", **params}, headers=HTML)
            assert r.status_code == 200 and "<html" not in r.text
            return re.findall(r'data-study="(\d+)"', r.text)

        assert shown(state="routed") == [str(node.study_id)]
        assert shown(state="receiving") == ["2"]
        assert shown(model="ct-hu-segmentation") == [str(node.study_id)]
        assert shown(model="ct-emphysema") == []
        assert shown(destination="web") == [str(node.study_id)]
        day = time.strftime("%Y-%m-%d", time.localtime(100.0))
        assert shown(since=day, until=day) == ["2", str(node.study_id)]
        assert shown(since="2030-01-01") == []
        r = c.get("/", params={"since": "yesterday"}, headers=HTML)
        assert r.status_code == 400 and r.json()["code"] == "invalid-parameters"


def test_study_page_shows_series_jobs_results_deliveries(node: ApiNode) -> None:
    node.catalog.delivery_failed(1, "association rejected by PACS", next_attempt_at=900.0, now=140.0)
    with _login(node) as c:
        text = c.get(f"/studies/{node.study_id}", headers=HTML).text
        assert "ct-hu-segmentation 1.1.0" in text and "host:1" in text
        assert "1.5 s / 3.0 s / 2.0 s" in text  # load / infer / encode
        assert "2.25.901" in text and "2.25.902" in text  # SEG and SR
        assert text.count('class="delivery"') == 4 and "association rejected by PACS" in text
        assert 'data-url="/api/v1/deliveries/1/retry"' in text
        assert f'data-url="/api/v1/studies/{node.study_id}/rerun"' in text
        assert f'href="/rules?study_id={node.study_id}"' in text
        for name in PHI:
            assert name not in text
        assert c.get("/studies/999", headers=HTML).status_code == 404
    with _login(node, Role.VIEWER) as c:
        text = c.get(f"/studies/{node.study_id}", headers=HTML).text
        assert "association rejected by PACS" in text and 'class="act"' not in text


def test_failures_page_lists_reasons_and_actions(node: ApiNode) -> None:
    node.catalog.delivery_failed(2, "connection refused", next_attempt_at=900.0, now=141.0)
    node.catalog.rerun_study(node.study_id, 150.0)
    node.catalog.claim_job(node.job_id, 151.0, worker="h:1", policy=JobPolicy())
    node.catalog.finish_job(node.job_id, JobState.FAILED, 152.0, error="ModelError: the lungs are missing")
    with _login(node) as c:
        text = c.get("/failures", headers=HTML).text
        assert "ModelError: the lungs are missing" in text and "connection refused" in text
        assert f'data-url="/api/v1/jobs/{node.job_id}/retry"' in text
        assert 'data-url="/api/v1/deliveries/2/retry"' in text
        assert 'data-url="/api/v1/destinations/pacs/pause"' in text
        r = c.post("/api/v1/destinations/pacs/pause", headers={"Origin": node.server.url})
        assert r.status_code == 200 and r.json()["paused"] is True
        text = c.get("/failures?fragment=1", headers=HTML).text
        assert 'data-url="/api/v1/destinations/pacs/resume"' in text and "<html" not in text
        r = c.post(f"/api/v1/jobs/{node.job_id}/retry", headers={"Origin": node.server.url})
        assert r.status_code == 202
        assert f'data-job="{node.job_id}"' not in c.get("/failures", headers=HTML).text


def test_safe_next_stays_on_this_node() -> None:
    assert safe_next("/studies/3?x=1") == "/studies/3?x=1"
    for bad in ("https://evil.example/", "//evil.example/", "/\\evil.example", "", None, "studies"):
        assert safe_next(bad) == "/"


def test_rules_page_posts_to_the_dry_run(node: ApiNode) -> None:
    with _login(node, Role.VIEWER) as c:
        text = c.get(f"/rules?study_id={node.study_id}", headers=HTML).text
        assert 'id="rules-test"' in text and f'value="{node.study_id}"' in text and 'data-autorun="1"' in text
        assert 'data-autorun=""' in c.get("/rules", headers=HTML).text
        assert c.get("/rules?study_id=0", headers=HTML).status_code == 400
        js = c.get("/ui/static/dashboard.js").text
        assert '"/api/v1/rules/test"' in js


def test_line_chart_leaves_gaps_and_escapes_labels() -> None:
    svg = str(line_chart("a <b> chart", [0.0, 3600.0, 7200.0, 10800.0],
                         [Line("p<50>", [1.0, None, 3.0, 4.0])], " s"))
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 and svg.count("<circle") == 3
    assert "a &lt;b&gt; chart" in svg and "p&lt;50&gt;" in svg and "<b>" not in svg
    assert "<polyline" not in str(line_chart("empty", [0.0, 3600.0], [Line("x", [None, None])]))
