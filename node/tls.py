"""DICOM TLS (PS3.15 Annex B, the BCP 195 non-downgrading profile) with Python's ``ssl``.

Both directions use the same rules: TLS 1.2 or later; for TLS 1.2 only forward-secret AEAD suites
(ECDHE with ECDSA or RSA, AES-128/256-GCM), for TLS 1.3 its own suites (all AEAD, all ephemeral);
no TLS compression, no renegotiation. The server (``node.tls``) asks for a client certificate signed
by ``ca_file`` and refuses a client without one when ``require_client_cert``; the client (a dimse
destination's ``tls``) verifies the peer's certificate and that it names the destination's ``host``.

Contexts are built from the files each time a server starts or an association is opened, so renewed
certificates are used without a restart of the sender (the SCP picks them up at its next start).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from models.errors import ConfigError
from node.config import TlsClientSettings, TlsServerSettings

BCP195_TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
))
"""The TLS 1.2 suites offered and accepted (OpenSSL names). TLS 1.3 suites are configured apart by
OpenSSL and are all AEAD with ephemeral key exchange: its defaults are kept."""


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_SINGLE_ECDH_USE
    return ctx


def _no_passphrase() -> bytes:
    raise ConfigError("the private key is encrypted: the node needs an unencrypted key_file (chmod 600)")


def _load_chain(ctx: ssl.SSLContext, key: str, cert_file: Path, key_file: Path) -> None:
    try:
        ctx.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except ConfigError as exc:
        raise ConfigError(f"{key}.key_file {key_file}: {exc}") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{key}: cannot load cert_file {cert_file} with key_file {key_file}: "
                          f"{getattr(exc, 'reason', None) or exc}") from None


def _load_ca(ctx: ssl.SSLContext, key: str, ca_file: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{key}.ca_file: cannot load {ca_file}: {getattr(exc, 'reason', None) or exc}") from None


def server_context(tls: TlsServerSettings, key: str = "node.tls") -> ssl.SSLContext:
    """The Storage SCP's context; :class:`ConfigError` naming the key if a file cannot be used."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(ctx, key, tls.cert_file, tls.key_file)
    if tls.ca_file is not None:
        _load_ca(ctx, key, tls.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(tls: TlsClientSettings, key: str = "tls") -> ssl.SSLContext:
    """A dimse destination's context: the server's certificate is verified (``ca_file`` or the system's
    trust store) and must name the host; our certificate is presented when configured."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # CERT_REQUIRED and check_hostname by default
    if tls.ca_file is not None:
        _load_ca(ctx, key, tls.ca_file)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.cert_file is not None and tls.key_file is not None:
        _load_chain(ctx, key, tls.cert_file, tls.key_file)
    return ctx
