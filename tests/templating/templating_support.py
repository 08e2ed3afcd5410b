"""Test data for the templating tests (imported by tests/templating/test_templating_*.py)."""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from marblekeep.manifest.model import Secret, SecretType
from marblekeep.templating import ReservedSecret, TemplateData

BYTES_0_15 = bytes(range(16))
SEAL_KEY = bytes(range(0xA0, 0xC0))  # 32 bytes
PLAIN_VALUE = b"correct horse battery staple"
NUL_VALUE = b"before\x00after-very-secret"


@dataclass(frozen=True)
class CertMaterial:
    cert: bytes  # DER
    public: bytes  # PKIX DER
    private: bytes  # PKCS#8 DER


@functools.cache
def cert_material(common_name: str = "templating test") -> CertMaterial:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1234)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return CertMaterial(
        cert=cert.public_bytes(serialization.Encoding.DER),
        public=key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        private=key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def secrets() -> dict[str, Secret]:
    cm = cert_material()
    return {
        "symKey": Secret(
            SecretType.SYMMETRIC_KEY, size=128, shared=True, public=BYTES_0_15, private=BYTES_0_15
        ),
        "my-key": Secret(
            SecretType.SYMMETRIC_KEY, size=128, public=BYTES_0_15[::-1], private=BYTES_0_15[::-1]
        ),
        "certShared": Secret(
            SecretType.CERT_ECDSA,
            size=256,
            shared=True,
            valid_for=365,
            cert=cm.cert,
            public=cm.public,
            private=cm.private,
        ),
        "plainPw": Secret(SecretType.PLAIN, user_defined=True, public=PLAIN_VALUE, private=PLAIN_VALUE),
        "plainNul": Secret(SecretType.PLAIN, user_defined=True, public=NUL_VALUE, private=NUL_VALUE),
        "plainEmpty": Secret(SecretType.PLAIN, user_defined=True),
        "unsetKey": Secret(SecretType.SYMMETRIC_KEY, size=256, user_defined=True),
        "ünï": Secret(SecretType.SYMMETRIC_KEY, size=8, public=b"\x01", private=b"\x01"),
    }


def previous_secrets() -> dict[str, Secret]:
    prev = bytes(range(16, 32))
    current = secrets()
    return {
        **current,
        "symKey": Secret(SecretType.SYMMETRIC_KEY, size=128, shared=True, public=prev, private=prev),
        "plainPw": Secret(SecretType.PLAIN, user_defined=True),
    }


def make_data(**overrides: object) -> TemplateData:
    leaf = cert_material("leaf")
    root = cert_material("root")
    values: dict[str, object] = {
        "root_ca": ReservedSecret(cert=root.cert),
        "marble_cert": ReservedSecret(cert=leaf.cert, public=leaf.public, private=leaf.private),
        "coordinator_root": ReservedSecret(cert=cert_material("coordinator root").cert),
        "coordinator_intermediate": ReservedSecret(cert=cert_material("coordinator intermediate").cert),
        "seal_key": SEAL_KEY,
        "secrets": secrets(),
        "previous_secrets": previous_secrets(),
    }
    values.update(overrides)
    return TemplateData(**values)  # type: ignore[arg-type]


def all_secret_bytes(data: TemplateData) -> list[bytes]:
    """Every secret value in ``data`` that is long enough to be recognisable in a message."""
    found: list[bytes] = [data.seal_key, data.marble_cert.private]
    for mapping in (data.secrets, data.previous_secrets):
        for secret in mapping.values():
            found.extend(v for v in (secret.private, secret.public) if v)
    return [v for v in found if len(v) >= 4]
