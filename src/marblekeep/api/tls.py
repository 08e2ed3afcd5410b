"""TLS for the Coordinator's listeners, and user authentication by client certificate.

Server credentials: a P-256 listener key with a certificate signed by the Coordinator's root (a
P-256 handshake costs half of a P-384 one; clients pin the root, so they keep working). It is made
fresh at every start and never stored.

User authentication (docs/governance.md): CPython's ``ssl`` cannot ask for a client certificate
without verifying it, so the server context loads the manifest's user certificates as trust
anchors (``CERT_OPTIONAL``, partial chains allowed, no time check: user certificates never expire,
as in MarbleRun). A certificate that is not listed therefore fails in the TLS handshake rather than
with HTTP 401. When the users change, a fresh context is built and swapped in from the SNI
callback, which OpenSSL calls on every handshake. The handler then matches the **leaf**
certificate's exact DER against the stored users; later chain entries are never considered (a
client can append anybody's public certificate after its own).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from marblekeep.crypto.pki import CertifiedKey, random_serial

__all__ = ["ServerCredentials", "TLSContexts", "make_server_credentials"]

#: OpenSSL's X509_V_FLAG_NO_CHECK_TIME: ignore validity periods of the user certificates.
VERIFY_NO_CHECK_TIME = 0x200000
LISTENER_VALIDITY = dt.timedelta(days=3650)


class ServerCredentials:
    def __init__(self, chain_pem: bytes, key_pem: bytes) -> None:
        self.chain_pem = chain_pem
        self._key_pem = key_pem

    def load_into(self, ctx: ssl.SSLContext) -> None:
        # ssl only loads from files: write to a private temporary directory and remove at once.
        with tempfile.TemporaryDirectory(prefix="marblekeep-tls-") as tmp:
            cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
            cert_path.write_bytes(self.chain_pem)
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self._key_pem)
            ctx.load_cert_chain(cert_path, key_path)


def make_server_credentials(
    root: CertifiedKey, dns_names: Sequence[str], now: dt.datetime
) -> ServerCredentials:
    key = ec.generate_private_key(ec.SECP256R1())
    dns: list[x509.GeneralName] = []
    ips: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    for name in dns_names:
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            dns.append(x509.DNSName(name))
        else:
            if x509.IPAddress(ip) not in ips:
                ips.append(x509.IPAddress(ip))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "marblekeep Coordinator")]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + LISTENER_VALIDITY)
        .add_extension(x509.SubjectAlternativeName([*dns, *ips]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()), critical=False
        )
        .sign(root.key, hashes.SHA384())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ServerCredentials(cert.public_bytes(serialization.Encoding.PEM), key_pem)


class TLSContexts:
    """The server-side SSL context of a listener, swapped whenever credentials or users change."""

    def __init__(self, credentials: ServerCredentials, user_certs_der: Iterable[bytes] = ()) -> None:
        self._base = self._build(credentials, ())
        self._base.sni_callback = self._on_handshake
        self._current = self._base
        self.update(credentials, user_certs_der)

    @property
    def base(self) -> ssl.SSLContext:
        """The context to give the listener; it redirects every handshake to the current one."""
        return self._base

    @staticmethod
    def _build(credentials: ServerCredentials, user_certs_der: Sequence[bytes]) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        credentials.load_into(ctx)
        if user_certs_der:
            ctx.verify_mode = ssl.CERT_OPTIONAL
            ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | VERIFY_NO_CHECK_TIME
            for der in user_certs_der:
                ctx.load_verify_locations(cadata=der)
        else:
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def update(self, credentials: ServerCredentials, user_certs_der: Iterable[bytes]) -> None:
        self._current = self._build(credentials, sorted(set(user_certs_der)))
        # The swap in the SNI callback is OpenSSL's SSL_set_SSL_CTX: it takes the certificate and
        # the trust store of the new context, but the verify mode and verify flags stay those of
        # the context the connection was created from. Keep them on the base context.
        self._base.verify_mode = self._current.verify_mode
        self._base.verify_flags = self._current.verify_flags

    def _on_handshake(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        if self._current is not self._base:
            sslobj.context = self._current


def match_user(leaf_der: bytes | None, users: Mapping[str, bytes]) -> str | None:
    """The name of the user whose certificate is exactly ``leaf_der`` (DER), else None."""
    if not leaf_der:
        return None
    for name, der in users.items():
        if der == leaf_der:
            return name
    return None
