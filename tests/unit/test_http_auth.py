"""Authentication and roles on the HTTP service (real uvicorn on loopback): every route of the app x
{no token, each role} against the role table, revoked tokens, the secure default, the principal the
audit trail reads, the token CLI and API (only hashes stored), OIDC JWTs signed here with a JWKS file,
and HTTPS with a generated certificate."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
import ssl
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import FastAPI, Request, Response

from models.errors import ConfigError
from node.catalog import Catalog
from node.cli import main
from node.config import OidcSettings, Settings, check_files, parse_settings
from node.http.app import create_app
from node.http.auth import OPEN_PATHS, Principal, RouteInfo, app_routes, issue_token
from node.http.context import NodeContext
from node.http.oidc import InvalidToken, OidcVerifier
from node.http.server import HttpServer
from node.receive.scp import Receiver
from node.roles import ROLE_PERMISSIONS, Permission, Role
from node.spool import Spool
from node.tokens import TOKEN_PREFIX, hash_token, list_tokens, revoke_token
from testkit.certs import make_pki
from tests.httpkit import bearer

ISSUER = "https://idp.example/realms/hospital"
AUDIENCE = "dicom-node"
ROLE_MAP = {"radiologist": "viewer", "modality": "sender", "pacs-admin": "admin", "it-ops": "operator"}


def _app(settings: Settings, catalog: Catalog) -> FastAPI:
    spool = Spool(settings.node.storage_dir)
    ctx = NodeContext(settings, catalog, spool, Receiver(settings, catalog, spool, time.time), time.time,
                      broker_reachable=lambda: True)
    return create_app(ctx)


def _settings(storage: Path, **http: Any) -> Settings:
    return parse_settings({"node": {"storage_dir": str(storage), "min_free_mb": 0},
                           "http": {"port": 0, **http},
                           "destinations": [{"name": "pacs", "type": "dimse", "ae_title": "PACS",
                                             "host": "127.0.0.1", "port": 104}]})


def _routes() -> list[RouteInfo]:
    with tempfile.TemporaryDirectory() as d:
        catalog = Catalog.for_storage(Path(d))
        try:
            return app_routes(_app(_settings(Path(d)), catalog))
        finally:
            catalog.engine.dispose()


ROUTES = _routes()
PROTECTED = [r for r in ROUTES if r.permission is not None]
PARAMS = {"study": "1.2.3", "series": "1.2.3.4", "instance": "1.2.3.4.5", "frames": "1", "frame": "1",
          "tag": "7FE00010", "study_id": "1", "job_id": "1", "object_id": "1", "delivery_id": "1", "batch_id": "1",
          "name": "pacs"}


def _url(route: RouteInfo) -> str:
    return re.sub(r"\{(\w+)(:path)?\}", lambda m: "swagger-ui.css" if m.group(2) else PARAMS[m.group(1)], route.path)


def _route_id(route: RouteInfo) -> str:
    return f"{'|'.join(sorted(route.methods))} {route.path}"


@dataclass
class Served:
    server: HttpServer
    catalog: Catalog
    tokens: dict[Role, str]
    principals: list[Principal | None]
    """``request.state.principal`` after each request (what the audit middleware reads)."""
    client: httpx.Client

    def request(self, method: str, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        headers = {**kw.pop("headers", {}), **(bearer(token) if token else {})}
        return self.client.request(method, self.server.url + path, headers=headers, **kw)


def _serve(settings: Settings, catalog: Catalog, **server: Any) -> tuple[HttpServer, list[Principal | None]]:
    app = _app(settings, catalog)
    principals: list[Principal | None] = []

    @app.middleware("http")
    async def after_the_route(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        principals.append(getattr(request.state, "principal", None))
        return response

    http = HttpServer(app, "127.0.0.1", 0, **server)
    http.start()
    return http, principals


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    storage = tmp_path_factory.mktemp("auth")
    catalog = Catalog.for_storage(storage)
    tokens = {role: issue_token(catalog, role) for role in Role}
    server, principals = _serve(_settings(storage), catalog)
    try:
        with httpx.Client(timeout=10) as client:
            yield Served(server, catalog, tokens, principals, client)
    finally:
        server.stop()
        catalog.engine.dispose()


def _assert_401(r: httpx.Response, error: bool = False) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["content-type"] == "application/problem+json" and r.json()["code"] == "unauthorized"
    challenges = r.headers.get_list("www-authenticate")
    assert any(c.startswith('Bearer realm="dicom-node"') for c in challenges), challenges
    assert any('error="invalid_token"' in c for c in challenges) == error


# ---- every route, every role ------------------------------------------------------------------
def test_every_route_but_health_requires_a_permission() -> None:
    assert {r.path for r in ROUTES if r.permission is None} == set(OPEN_PATHS)
    assert {r.path for r in ROUTES} >= {"/dicom-web/studies", "/api/v1/studies", "/metrics", "/docs",
                                         "/openapi.json", "/api/v1/tokens"}
    assert {r.permission for r in PROTECTED} == set(Permission)  # each permission guards something


def test_health_is_open(served: Served) -> None:
    assert served.request("GET", "/healthz").status_code == 200
    assert served.request("GET", "/readyz").status_code == 200


@pytest.mark.parametrize("route", PROTECTED, ids=_route_id)
def test_no_token_or_a_bad_one_is_401(served: Served, route: RouteInfo) -> None:
    [method] = route.methods
    _assert_401(served.request(method, _url(route)))
    _assert_401(served.request(method, _url(route), TOKEN_PREFIX + "not-a-token"), error=True)
    _assert_401(served.request(method, _url(route), headers={"Authorization": "Token " + served.tokens[Role.ADMIN]}))


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("route", PROTECTED, ids=_route_id)
def test_the_role_table_decides(served: Served, route: RouteInfo, role: Role) -> None:
    [method] = route.methods
    r = served.request(method, _url(route), served.tokens[role])
    assert route.permission is not None
    if route.permission in ROLE_PERMISSIONS[role]:
        assert r.status_code not in (401, 403), r.text  # the route ran (404, 400... for made-up ids)
    else:
        assert r.status_code == 403, r.text
        assert r.headers["content-type"] == "application/problem+json" and r.json()["code"] == "forbidden"
    principal = served.principals[-1]
    assert principal is not None and (principal.role, principal.kind) == (role.value, "token")
    assert principal.name == f"{role.value}-1"


def test_roles() -> None:
    """The role table, as the README states it."""
    viewer = {Permission.DICOMWEB_READ, Permission.API_READ, Permission.METRICS, Permission.DOCS}
    assert ROLE_PERMISSIONS[Role.VIEWER] == viewer
    assert ROLE_PERMISSIONS[Role.SENDER] == {Permission.DICOMWEB_STORE}
    assert ROLE_PERMISSIONS[Role.OPERATOR] == viewer | {Permission.API_ACTIONS}
    assert ROLE_PERMISSIONS[Role.ADMIN] == set(Permission)


def test_no_principal_without_a_token(served: Served) -> None:
    served.request("GET", "/api/v1/studies")
    assert served.principals[-1] is None


# ---- tokens -------------------------------------------------------------------------------------
def test_a_revoked_token_is_401_at_once(served: Served) -> None:
    token = issue_token(served.catalog, Role.VIEWER, name="short-lived")
    assert served.request("GET", "/api/v1/studies", token).status_code == 200
    assert revoke_token(served.catalog, "short-lived", time.time())
    _assert_401(served.request("GET", "/api/v1/studies", token), error=True)
    again = issue_token(served.catalog, Role.VIEWER, name="short-lived")  # the name is free again
    assert served.request("GET", "/api/v1/studies", again).status_code == 200
    _assert_401(served.request("GET", "/api/v1/studies", token), error=True)


def test_the_node_refuses_when_no_token_exists(tmp_path: Path) -> None:
    """Secure by default: no token, no OIDC: every protected route is 401, and the host is loopback."""
    settings, catalog = _settings(tmp_path), Catalog.for_storage(tmp_path)
    assert settings.http.host == "127.0.0.1" and settings.http.oidc is None and list_tokens(catalog) == []
    server, _ = _serve(settings, catalog)
    try:
        for path in ("/api/v1/studies", "/dicom-web/studies", "/metrics", "/docs", "/openapi.json"):
            _assert_401(httpx.get(server.url + path))
        _assert_401(httpx.post(server.url + "/dicom-web/studies", content=b"x"))
        assert httpx.get(server.url + "/healthz").status_code == 200
    finally:
        server.stop()


def test_last_used_and_the_api_for_admins(served: Served) -> None:
    admin = served.tokens[Role.ADMIN]
    listed = served.request("GET", "/api/v1/tokens", admin).json()
    assert {(t["name"], t["role"]) for t in listed} >= {(f"{r.value}-1", r.value) for r in Role}
    me = next(t for t in listed if t["name"] == "admin-1")
    assert me["last_used_at"] is not None and me["revoked_at"] is None
    text = json.dumps(listed)
    assert all(t not in text for t in served.tokens.values()) and hash_token(admin) not in text
    r = served.request("POST", "/api/v1/tokens", admin, json={"name": "pacs-router", "role": "sender"})
    assert r.status_code == 201 and r.json()["role"] == "sender"
    new = r.json()["token"]
    assert new.startswith(TOKEN_PREFIX) and served.request("POST", "/dicom-web/studies", new).status_code != 401
    assert served.request("POST", "/api/v1/tokens", admin, json={"name": "pacs-router", "role": "sender"}
                          ).json()["code"] == "name-taken"
    assert served.request("POST", "/api/v1/tokens", admin, json={"name": "x", "role": "god"}).status_code == 400
    assert served.request("POST", "/api/v1/tokens/pacs-router/revoke", admin).json()["revoked_at"] is not None
    assert served.request("POST", "/api/v1/tokens/pacs-router/revoke", admin).status_code == 404
    _assert_401(served.request("POST", "/dicom-web/studies", new), error=True)


def test_token_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"node": {"storage_dir": str(tmp_path / "s")}}))
    assert main(["token", "create", "--name", "ci-bot", "--role", "sender", "-c", str(config)]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert re.fullmatch(TOKEN_PREFIX + r"[A-Za-z0-9_-]{43}", token) and "shown once" in out.err
    assert main(["token", "list", "-c", str(config)]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"ci-bot\s+sender\s+\d{4}-\d\d-\d\dT", listing) and token not in listing
    assert hash_token(token) not in listing
    assert main(["token", "create", "--name", "ci-bot", "--role", "viewer", "-c", str(config)]) == 2  # taken
    assert "exists" in capsys.readouterr().err
    assert main(["token", "create", "--name", "no spaces", "--role", "viewer", "-c", str(config)]) == 2
    with pytest.raises(SystemExit):
        main(["token", "create", "--name", "x", "--role", "superuser", "-c", str(config)])
    capsys.readouterr()
    catalog = tmp_path / "s" / "catalog.sqlite3"
    stored = b"".join(p.read_bytes() for p in catalog.parent.glob("catalog.sqlite3*"))
    assert token.encode() not in stored and hash_token(token).encode() in stored  # only the hash
    assert main(["token", "revoke", "ci-bot", "-c", str(config)]) == 0
    assert main(["token", "revoke", "ci-bot", "-c", str(config)]) == 1
    assert main(["token", "list", "-c", str(config)]) == 0
    [row] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ci-bot")]
    assert row.split()[-1] != "-"  # revoked, with its date


# ---- OIDC ---------------------------------------------------------------------------------------
@dataclass
class Idp:
    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey
    jwks_file: Path

    def token(self, claims: dict[str, Any] | None = None, *, kid: str = "rsa-1", alg: str = "RS256",
              drop: tuple[str, ...] = ()) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "u-123", "preferred_username": "dr.who",
                "iat": now, "exp": now + 300, "realm_access": {"roles": ["radiologist", "offline_access"]},
                **(claims or {})}
        for k in drop:
            body.pop(k)
        key: Any = self.ec_key if alg == "ES256" else self.rsa_key
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})


def _jwk(public: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.algorithms.ECAlgorithm if alg == "ES256" else jwt.algorithms.RSAAlgorithm
    jwk: dict[str, Any] = json.loads(algorithm.to_jwk(public))
    return {**jwk, "kid": kid, "use": "sig", "alg": alg}


def _unsigned(header: dict[str, Any], claims: dict[str, Any], key: bytes | None = None) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest()) if key is not None else ""
    return f"{signing_input}.{signature}"


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Idp:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks_file = tmp_path_factory.mktemp("idp") / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [_jwk(rsa_key.public_key(), "rsa-1", "RS256"),
                                              _jwk(ec_key.public_key(), "ec-1", "ES256")]}))
    return Idp(rsa_key, ec_key, jwks_file)


def _oidc(idp: Idp, **kw: Any) -> dict[str, Any]:
    return {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(idp.jwks_file),
            "roles_claim": "realm_access.roles", "role_map": ROLE_MAP, "name_claim": "preferred_username", **kw}


@pytest.fixture(scope="module")
def oidc_served(tmp_path_factory: pytest.TempPathFactory, idp: Idp) -> Iterator[Served]:
    storage = tmp_path_factory.mktemp("oidc")
    catalog = Catalog.for_storage(storage)
    server, principals = _serve(_settings(storage, oidc=_oidc(idp)), catalog)
    try:
        with httpx.Client(timeout=10) as client:
            yield Served(server, catalog, {Role.ADMIN: issue_token(catalog, Role.ADMIN)}, principals, client)
    finally:
        server.stop()
        catalog.engine.dispose()


def test_oidc_valid_tokens_map_their_roles(oidc_served: Served, idp: Idp) -> None:
    s = oidc_served
    assert s.request("GET", "/api/v1/studies", idp.token()).status_code == 200
    assert s.principals[-1] == Principal("dr.who", "viewer", "oidc", ROLE_PERMISSIONS[Role.VIEWER])
    assert s.request("POST", "/api/v1/jobs/1/retry", idp.token()).status_code == 403  # a viewer
    assert s.request("GET", "/api/v1/studies", idp.token(kid="ec-1", alg="ES256")).status_code == 200
    sender = idp.token({"realm_access": {"roles": ["modality"]}})
    assert s.request("GET", "/api/v1/studies", sender).status_code == 403
    assert s.request("POST", "/dicom-web/studies", sender).status_code not in (401, 403)
    both = idp.token({"realm_access": {"roles": ["modality", "it-ops"]}})
    assert s.request("POST", "/api/v1/jobs/1/retry", both).status_code == 404  # operator's action, no such job
    assert s.request("POST", "/dicom-web/studies", both).status_code not in (401, 403)
    assert s.principals[-1] is not None and s.principals[-1].role == "sender+operator"
    nobody = idp.token({"realm_access": {"roles": ["offline_access"]}})
    r = s.request("GET", "/api/v1/studies", nobody)
    assert r.status_code == 403 and s.principals[-1] is not None and s.principals[-1].role == ""
    assert s.request("GET", "/api/v1/studies", s.tokens[Role.ADMIN]).status_code == 200  # API tokens too


@pytest.mark.parametrize(("case", "reason"), [
    ("expired", "expired"), ("not yet", "not valid yet"), ("audience", "wrong audience"),
    ("issuer", "wrong issuer"), ("unknown kid", "unknown signing key"), ("no exp", "invalid token"),
    ("alg none", "not accepted"), ("HS256 with the public key", "not accepted"),
    ("RS256 under the EC key", "does not match"), ("tampered", "invalid token"),
])
def test_oidc_refusals(oidc_served: Served, idp: Idp, case: str, reason: str) -> None:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "u-1", "exp": now + 300, "realm_access": {"roles": ["pacs-admin"]}}
    public_pem = idp.rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    token = {
        "expired": lambda: idp.token({"exp": now - 120, "iat": now - 600}),  # past the 30 s leeway
        "not yet": lambda: idp.token({"nbf": now + 600}),
        "audience": lambda: idp.token({"aud": "another-app"}),
        "issuer": lambda: idp.token({"iss": "https://evil.example"}),
        "unknown kid": lambda: idp.token(kid="rsa-2"),
        "no exp": lambda: idp.token(drop=("exp",)),
        "alg none": lambda: _unsigned({"alg": "none", "kid": "rsa-1"}, claims),
        "HS256 with the public key": lambda: _unsigned({"alg": "HS256", "kid": "rsa-1"}, claims, public_pem),
        "RS256 under the EC key": lambda: idp.token(kid="ec-1"),
        "tampered": lambda: idp.token().rsplit(".", 1)[0] + "." + idp.token({"sub": "x"}).rsplit(".", 1)[1],
    }[case]()
    r = oidc_served.request("GET", "/api/v1/studies", token)
    _assert_401(r, error=True)
    assert reason in r.json()["detail"]


def test_oidc_key_rotation_reads_the_keys_again_at_most_once_a_minute(idp: Idp, tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(idp.jwks_file.read_text())
    clock = [1000.0]
    verifier = OidcVerifier(OidcSettings.model_validate(_oidc(idp, jwks_file=str(jwks))), monotonic=lambda: clock[0])
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rotated = Idp(new_key, idp.ec_key, jwks)
    keys = json.loads(jwks.read_text())["keys"] + [_jwk(new_key.public_key(), "rsa-2", "RS256")]
    with pytest.raises(InvalidToken, match="unknown signing key"):
        verifier.verify(rotated.token(kid="rsa-2"))
    jwks.write_text(json.dumps({"keys": keys}))
    clock[0] += 30
    with pytest.raises(InvalidToken, match="unknown signing key"):  # read less than a minute ago
        verifier.verify(rotated.token(kid="rsa-2"))
    clock[0] += 31
    assert verifier.verify(rotated.token(kid="rsa-2")).roles == (Role.VIEWER,)


def test_oidc_jwks_url_is_fetched_at_start_and_on_unknown_kids_once_a_minute(idp: Idp) -> None:
    fetched: list[str] = []
    clock = [0.0]

    def fetch(url: str) -> bytes:
        fetched.append(url)
        return idp.jwks_file.read_bytes()

    settings = OidcSettings.model_validate(_oidc(idp, jwks_file=None, jwks_url="https://idp.example/certs"))
    verifier = OidcVerifier(settings, fetch=fetch, monotonic=lambda: clock[0])
    assert fetched == ["https://idp.example/certs"]  # at start-up
    assert verifier.verify(idp.token()).name == "dr.who"
    clock[0] = 120.0
    for _ in range(5):
        with pytest.raises(InvalidToken):
            verifier.verify(idp.token(kid="nope"))
    assert len(fetched) == 2  # once for the five unknown kids


def test_oidc_provider_down_at_start_does_not_stop_the_node(idp: Idp) -> None:
    def down(url: str) -> bytes:
        raise OSError("connection refused")

    settings = OidcSettings.model_validate(_oidc(idp, jwks_file=None, jwks_url="https://idp.example/certs"))
    verifier = OidcVerifier(settings, fetch=down)
    with pytest.raises(InvalidToken, match="unknown signing key"):
        verifier.verify(idp.token())
    with pytest.raises(ConfigError, match="jwks_file"):
        OidcVerifier(OidcSettings.model_validate(_oidc(idp, jwks_file="/nonexistent/jwks.json")))


def test_oidc_settings() -> None:
    with pytest.raises(ConfigError, match="exactly one of jwks_file and jwks_url"):
        parse_settings({"node": {"storage_dir": "/tmp/x"}, "http": {"oidc": {"issuer": "i", "audience": "a"}}})
    with pytest.raises(ConfigError, match=r"role_map\.x"):
        parse_settings({"node": {"storage_dir": "/tmp/x"}, "http": {"oidc": {
            "issuer": "i", "audience": "a", "jwks_file": "/k", "role_map": {"x": "root"}}}})
    with pytest.raises(ConfigError, match="algorithms"):
        parse_settings({"node": {"storage_dir": "/tmp/x"}, "http": {"oidc": {
            "issuer": "i", "audience": "a", "jwks_file": "/k", "algorithms": ["HS256"]}}})


# ---- HTTPS --------------------------------------------------------------------------------------
def test_https_with_tls_1_2_or_later(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    settings, catalog = _settings(tmp_path / "s"), Catalog.for_storage(tmp_path / "s")
    token = issue_token(catalog, Role.VIEWER)
    server, _ = _serve(settings, catalog, certfile=pki.server_cert, keyfile=pki.server_key)
    try:
        assert server.url.startswith("https://")
        context = server._config.ssl  # whatever OpenSSL's system policy says, the node says TLS 1.2+
        assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2
        trust = ssl.create_default_context(cafile=str(pki.ca_cert))
        assert httpx.get(server.url + "/healthz", verify=trust).status_code == 200
        assert httpx.get(server.url + "/api/v1/studies", verify=trust, headers=bearer(token)).status_code == 200
        with pytest.raises(httpx.ConnectError):  # a certificate nobody vouched for
            httpx.get(server.url + "/healthz", verify=ssl.create_default_context())
        with warnings.catch_warnings():  # a TLS 1.1 client, deprecated on purpose
            warnings.simplefilter("ignore", DeprecationWarning)
            old = ssl.create_default_context(cafile=str(pki.ca_cert))
            old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            old.maximum_version = ssl.TLSVersion.TLSv1_1
            old.set_ciphers("ALL:@SECLEVEL=0")
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, pytest.raises(ssl.SSLError):
                old.wrap_socket(raw, server_hostname="127.0.0.1").close()
        tls12 = ssl.create_default_context(cafile=str(pki.ca_cert))
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
                tls12.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            assert conn.version() == "TLSv1.2"
    finally:
        server.stop()


def test_https_files_are_checked(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    settings = _settings(tmp_path / "s", tls={"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)})
    check_files(settings)
    pki.server_key.chmod(0o644)
    with pytest.raises(ConfigError, match=r"http\.tls\.key_file: .*chmod 600"):
        check_files(settings)
    broken = HttpServer(FastAPI(), "127.0.0.1", 0, certfile=pki.server_cert, keyfile=pki.ca_cert)
    with pytest.raises(ConfigError, match=r"http\.tls"):
        broken.start()
