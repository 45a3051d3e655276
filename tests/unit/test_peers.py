"""Peer matching (node.peers), the DIMSE security settings and their file checks, the TLS contexts."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from models.errors import ConfigError
from node.config import Settings, TlsClientSettings, check_files, check_secret_file, parse_settings
from node.peers import REASON_ADDRESS, REASON_UNKNOWN_AE, PeerTable
from node.tls import client_context, server_context
from testkit.certs import Pki, make_pki


def settings(tmp_path: Path, node: dict[str, Any] | None = None, **top: Any) -> Settings:
    return parse_settings({"node": {"storage_dir": str(tmp_path / "s"), **(node or {})}, **top})


def resolver(names: dict[str, set[str]]) -> Any:
    return lambda host: names.get(host, set())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# ---- peer matching --------------------------------------------------------------------------------

def test_defaults_are_closed(tmp_path: Path) -> None:
    n = settings(tmp_path).node
    assert (n.peers, n.accept_unknown_peers, n.require_called_ae_title, n.plain, n.tls) == ([], False, True, True,
                                                                                             None)
    assert PeerTable.from_settings(settings(tmp_path)).admit("ANYONE", "127.0.0.1").reason == REASON_UNKNOWN_AE


def test_ae_title_ip_cidr_and_hostname(tmp_path: Path) -> None:
    s = settings(tmp_path, {"peers": [
        {"ae_title": "CT1", "host": "10.0.0.5", "allow": ["store"]},
        {"ae_title": "WARD", "host": "10.1.2.0/24", "allow": ["echo"]},
        {"ae_title": "MR", "host": "mr.hospital.example", "allow": ["echo", "store"]},
        {"ae_title": "ROAMING", "allow": ["echo"]},
    ]})
    table = PeerTable.from_settings(s, resolver({"mr.hospital.example": {"10.0.0.9", "fd00::9"}}))
    assert table.admit("CT1", "10.0.0.5").allow == {"store"}
    assert table.admit("CT1 ", "::ffff:10.0.0.5").allow == {"store"}  # padding, IPv4-mapped IPv6
    assert table.admit("CT1", "10.0.0.6").reason == REASON_ADDRESS
    assert table.admit("ct1", "10.0.0.5").reason == REASON_UNKNOWN_AE  # AE titles are case-sensitive
    assert table.admit("WARD", "10.1.2.200").allow == {"echo"}
    assert table.admit("WARD", "10.1.3.1").reason == REASON_ADDRESS
    assert table.admit("MR", "10.0.0.9").allow == {"echo", "store"}
    assert table.admit("MR", "fd00::9").allow == {"echo", "store"}
    assert table.admit("MR", "10.0.0.10").reason == REASON_ADDRESS
    assert table.admit("ROAMING", "192.0.2.1").allow == {"echo"}
    assert not table.admit("NOBODY", "10.0.0.5").accepted


def test_entries_of_one_title_add_up_and_unresolvable_names_match_nothing(tmp_path: Path) -> None:
    s = settings(tmp_path, {"peers": [
        {"ae_title": "PACS", "host": "10.0.0.0/8", "allow": ["echo"]},
        {"ae_title": "PACS", "host": "10.0.0.7", "allow": ["store"]},
        {"ae_title": "GONE", "host": "gone.example", "allow": ["store"]},
    ]})
    table = PeerTable.from_settings(s, resolver({}))
    assert table.admit("PACS", "10.0.0.7").allow == {"echo", "store"}
    assert table.admit("PACS", "10.9.9.9").allow == {"echo"}
    assert table.admit("GONE", "10.0.0.1").reason == REASON_ADDRESS
    assert table.admit("PACS", "not-an-ip").reason == REASON_ADDRESS


def test_dimse_destinations_are_implicit_peers(tmp_path: Path) -> None:
    s = settings(tmp_path, destinations=[
        {"name": "pacs", "type": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242},
        {"name": "archive", "type": "dimse", "ae_title": "ARCH", "host": "archive.example", "port": 104},
        {"name": "web", "type": "dicomweb", "url": "https://pacs.example/dicom-web"},
    ], priors={"source": "pacs"})
    table = PeerTable.from_settings(s, resolver({"archive.example": {"10.0.0.3"}}))
    assert table.admit("ORTHANC", "127.0.0.1").allow == {"echo", "store"}
    assert table.admit("ORTHANC", "127.0.0.2").reason == REASON_ADDRESS
    assert table.admit("ARCH", "10.0.0.3").allow == {"echo", "store"}
    assert [r.source for r in table.rules] == ["destinations[pacs]", "destinations[archive]"]


def test_accept_unknown_peers(tmp_path: Path) -> None:
    s = settings(tmp_path, {"accept_unknown_peers": True,
                            "peers": [{"ae_title": "CT1", "host": "10.0.0.5", "allow": ["echo"]}]})
    table = PeerTable.from_settings(s)
    assert table.admit("WHOEVER", "192.0.2.7").allow == {"echo", "store"}
    assert table.admit("CT1", "192.0.2.7").reason == REASON_ADDRESS  # a known title from elsewhere: still out


# ---- settings -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("peer", "message"), [
    ({"ae_title": "CT1", "host": "10.0.0.5/24", "allow": ["store"]}, "not a CIDR network"),
    ({"ae_title": "CT1", "host": "bad host!", "allow": ["store"]}, "neither an IP address"),
    ({"ae_title": "CT1", "host": "10.0.0.5", "allow": ["write"]}, "allow"),
    ({"ae_title": "CT1", "host": "10.0.0.5"}, "allow"),
    ({"ae_title": "A" * 17, "allow": ["echo"]}, "ae_title"),
])
def test_invalid_peers_are_refused(tmp_path: Path, peer: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings(tmp_path, {"peers": [peer]})


def test_host_forms_are_normalised(tmp_path: Path) -> None:
    s = settings(tmp_path, {"peers": [{"ae_title": "A", "host": " 10.1.0.0/16 ", "allow": ["echo"]},
                                      {"ae_title": "B", "host": "PACS.Hospital.Example", "allow": ["echo"]},
                                      {"ae_title": "C", "host": "fd00:0::1", "allow": ["echo"]}]})
    assert [p.host for p in s.node.peers] == ["10.1.0.0/16", "pacs.hospital.example", "fd00::1"]


def tls_node(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {"tls": {"port": 2762, "cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
                    "ca_file": str(pki.ca_cert), **extra}}


def test_tls_settings_validation(tmp_path: Path, pki: Pki) -> None:
    assert settings(tmp_path, {**tls_node(pki), "plain": False}).node.tls is not None
    with pytest.raises(ConfigError, match="plain: false needs tls"):
        settings(tmp_path, {"plain": False})
    with pytest.raises(ConfigError, match="is the plain DIMSE port too"):
        settings(tmp_path, {**tls_node(pki, port=11112)})
    with pytest.raises(ConfigError, match="require_client_cert needs ca_file"):
        settings(tmp_path, {**tls_node(pki, ca_file=None)})
    assert settings(tmp_path, tls_node(pki, ca_file=None, require_client_cert=False)).node.tls is not None
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        settings(tmp_path, destinations=[{"name": "p", "type": "dimse", "ae_title": "P", "host": "h", "port": 1,
                                          "tls": {"cert_file": str(pki.client_cert)}}])


def test_check_files_refuses_missing_and_shared_keys(tmp_path: Path, pki: Pki) -> None:
    check_files(settings(tmp_path, tls_node(pki)))
    with pytest.raises(ConfigError, match=r"node\.tls\.cert_file: cannot read .*missing\.crt"):
        check_files(settings(tmp_path, tls_node(pki, cert_file=str(tmp_path / "missing.crt"))))
    with pytest.raises(ConfigError, match=r"node\.tls\.ca_file: cannot read"):
        check_files(settings(tmp_path, tls_node(pki, ca_file=str(tmp_path / "missing-ca.crt"))))
    shared = tmp_path / "shared.key"
    shared.write_bytes(pki.server_key.read_bytes())
    shared.chmod(0o640)
    with pytest.raises(ConfigError) as err:
        check_files(settings(tmp_path, tls_node(pki, key_file=str(shared))))
    assert str(err.value) == (f"node.tls.key_file: {shared} is readable by group or others (mode 0640); "
                              f"make it private to the node's user: chmod 600 {shared}")
    dest = {"name": "pacs", "type": "dimse", "ae_title": "P", "host": "127.0.0.1", "port": 104,
            "tls": {"ca_file": str(pki.ca_cert), "cert_file": str(pki.client_cert), "key_file": str(shared)}}
    with pytest.raises(ConfigError, match=r"destinations\[pacs\]\.tls\.key_file: .* chmod 600"):
        check_files(settings(tmp_path, destinations=[dest]))
    shared.chmod(0o600)
    check_files(settings(tmp_path, destinations=[dest]))


def test_check_files_refuses_shared_dicomweb_secrets(tmp_path: Path) -> None:
    token, password = tmp_path / "token", tmp_path / "password"
    web = [{"name": "web", "type": "dicomweb", "url": "https://pacs/dicom-web", "token_file": str(token)},
           {"name": "basic", "type": "dicomweb", "url": "https://pacs/dicom-web", "username": "u",
            "password_file": str(password)}]
    check_files(settings(tmp_path, destinations=web))  # missing: read at each send (check-config says so)
    token.write_text("t")
    token.chmod(0o604)
    with pytest.raises(ConfigError, match=r"destinations\[web\]\.token_file: .*mode 0604"):
        check_files(settings(tmp_path, destinations=web))
    token.chmod(0o600)
    password.write_text("p")
    password.chmod(0o644)
    with pytest.raises(ConfigError, match=r"destinations\[basic\]\.password_file"):
        check_files(settings(tmp_path, destinations=web))
    password.chmod(0o400)
    check_files(settings(tmp_path, destinations=web))


def test_check_secret_file_helper(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    with pytest.raises(ConfigError, match=r"^http\.x: cannot read"):
        check_secret_file("http.x", secret)
    check_secret_file("http.x", secret, must_exist=False)
    with pytest.raises(ConfigError, match="not a regular file"):
        check_secret_file("http.x", tmp_path)
    secret.write_text("x")
    secret.chmod(0o600)
    check_secret_file("http.x", secret)


# ---- TLS contexts ---------------------------------------------------------------------------------

def test_contexts_follow_bcp195(tmp_path: Path, pki: Pki) -> None:
    node_tls = settings(tmp_path, tls_node(pki)).node.tls
    assert node_tls is not None
    server = server_context(node_tls)
    client = client_context(TlsClientSettings(ca_file=pki.ca_cert, cert_file=pki.client_cert,
                                              key_file=pki.client_key))
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION
        tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
        assert tls12 == {"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
                         "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384"}
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    lax = settings(tmp_path, tls_node(pki, require_client_cert=False)).node.tls
    assert lax is not None and server_context(lax).verify_mode == ssl.CERT_OPTIONAL


def test_unusable_key_files_are_config_errors(tmp_path: Path, pki: Pki) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ConfigError, match="encrypted"):
        client_context(TlsClientSettings(cert_file=pki.client_cert, key_file=encrypted), "destinations[p].tls")
    with pytest.raises(ConfigError, match=r"destinations\[p\]\.tls: cannot load cert_file"):
        client_context(TlsClientSettings(cert_file=pki.server_cert, key_file=pki.client_key), "destinations[p].tls")


def test_example_config_lets_the_first_run_in() -> None:
    import yaml

    from node.config import load_settings

    example = Path(__file__).resolve().parents[2] / "deploy" / "config.example.yaml"
    s = load_settings(example, environ={})
    assert s.node.require_called_ae_title and not s.node.accept_unknown_peers and s.node.plain
    table = PeerTable.from_settings(s)
    assert table.admit("STORESCU", "127.0.0.1").allow == {"echo", "store"}  # README's storescu push
    assert table.admit("ORTHANC", "127.0.0.1").allow == {"echo", "store"}
    assert table.admit("STORESCU", "10.0.0.1").reason == REASON_ADDRESS
    assert not table.admit("ECHOSCU", "127.0.0.1").accepted
    # the commented tls blocks are valid once uncommented
    lines = example.read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.lstrip().startswith("# tls:") and "DICOM TLS" in line:
            col = line.index("#")
            block = [line[col + 2:]]
            for nxt in lines[i + 1:]:
                if not nxt.startswith(" " * col + "#   "):
                    break
                block.append(nxt[col + 2:])
            blocks.append(yaml.safe_load("\n".join(block))["tls"])
    node_tls, dest_tls = blocks
    assert node_tls["port"] == 2762 and dest_tls["key_file"]
    data = yaml.safe_load(example.read_text())
    data["node"]["tls"] = node_tls
    data["destinations"][0]["tls"] = dest_tls
    assert parse_settings(data).node.tls is not None
