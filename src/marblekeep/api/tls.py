"""The listeners' TLS credentials, and user authentication by client certificate.

Server credentials: a P-256 listener key with a certificate signed by the Coordinator's root (a
P-256 handshake costs half of a P-384 one; clients pin the root, so they keep working). It is made
fresh at every start and at a root change, lives only as a ``cryptography`` key object in memory,
and is handed to the TLS layer (api/tlslayer.py) as that object: it is never serialized, never
written to a file (docs/adr/0002-tls-layer.md).

User authentication (docs/governance.md, docs/adr/0002-tls-layer.md): the TLS layer asks every client
for a certificate and accepts any (or none); the handler then matches the **leaf** certificate's
exact DER against the stored users. Later chain entries are never considered (a client can append
anybody's public certificate after its own). An unlisted certificate therefore completes the
handshake and gets HTTP 401 from the endpoints that need a user, as in MarbleRun.
"""

from __future__ import annotations

import datetime as dt
import hmac
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from marblekeep.crypto.pki import CertifiedKey, random_serial

__all__ = ["ServerCredentials", "make_server_credentials", "match_user"]

LISTENER_VALIDITY = dt.timedelta(days=3650)


@dataclass(frozen=True)
class ServerCredentials:
    """A listener's certificate chain (leaf first) and its private key, as objects in memory."""

    chain: tuple[x509.Certificate, ...]
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        if not self.chain:
            raise ValueError("ServerCredentials: the certificate chain is empty")

    @property
    def chain_pem(self) -> bytes:
        """The public chain as PEM (what clients see); the key has no serialized form here."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)


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
    return ServerCredentials((cert,), key)


def match_user(leaf_der: bytes | None, users: Mapping[str, bytes]) -> str | None:
    """The name of the user whose certificate is exactly ``leaf_der`` (DER), else None."""
    if not leaf_der:
        return None
    found = None
    for name, der in users.items():
        if hmac.compare_digest(der, leaf_der) and found is None:
            found = name
    return found
