"""Secret generation and derivation: HKDF known answers, properties, certificate secrets."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import ipaddress
import shutil
import subprocess
from functools import cache
from pathlib import Path
from uuid import UUID, uuid4

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from marblekeep.crypto.pki import CertifiedKey, create_intermediate, create_root_ca, der_to_pem
from marblekeep.crypto.secretgen import (
    DEFAULT_CERT_COMMON_NAME,
    cert_template_from_certificate,
    derive_marble_key,
    derive_seal_key,
    generate_cert_secret,
    generate_marble_secrets,
    generate_shared_secrets,
    generate_symmetric_key,
    legacy_root_secret,
)
from marblekeep.errors import ActivationRefused, ManifestError
from marblekeep.manifest.model import CertTemplate, Secret, SecretType

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
ROOT_SECRET = bytes(range(32))
SEAL_MASTER = bytes(range(100, 132))
UID = UUID("3f2504e0-4f89-11d3-9a0c-0305e82c3301")
LOOPBACK = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


@cache
def pki() -> tuple[CertifiedKey, CertifiedKey, CertifiedKey]:
    root = create_root_ca(["localhost"], NOW)
    intermediate, marble_root = create_intermediate(root, ["localhost"], NOW)
    return root, intermediate, marble_root


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30, check=False)


def cert_of(secret: Secret) -> x509.Certificate:
    assert secret.cert is not None
    return x509.load_der_x509_certificate(secret.cert)


def ext(cert: x509.Certificate, cls: type[x509.ExtensionType]) -> x509.ExtensionType:
    return cert.extensions.get_extension_for_class(cls).value


# ---------------------------------------------------------------- symmetric keys: known answers


def rfc5869(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 straight from RFC 5869 with the stdlib, as a second independent reference."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    block, okm, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def test_per_marble_key_known_answer() -> None:
    salt = b"3f2504e0-4f89-11d3-9a0c-0305e82c3301" + b"symmetricKeyPrivate"
    expected = HKDF(algorithm=hashes.SHA256(), length=16, salt=salt, info=b"backend").derive(ROOT_SECRET)
    got = derive_marble_key(ROOT_SECRET, UID, "symmetricKeyPrivate", "backend", 128, disable_binding=False)
    assert got == expected == rfc5869(ROOT_SECRET, salt, b"backend", 16)
    assert got.hex() == "bd644ef4fb0ffc454c6235fb15942f4a"
    unbound = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"").derive(ROOT_SECRET)
    assert derive_marble_key(
        ROOT_SECRET, UID, "symmetricKeyPrivate", "backend", 256, disable_binding=True
    ) == (unbound)


def test_seal_key_known_answer() -> None:
    expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=UID.bytes, info=b"").derive(SEAL_MASTER)
    assert UID.bytes == bytes.fromhex("3f2504e04f8911d39a0c0305e82c3301")
    got = derive_seal_key(SEAL_MASTER, UID)
    assert got == expected == rfc5869(SEAL_MASTER, UID.bytes, b"", 32)
    assert got.hex() == "d0fcea503185d5d5baa836797e77483ba70994b49068f234b24cf5f01de5d6af"


def test_marble_key_uses_canonical_uuid_form() -> None:
    # Braces / urn / upper case parse to the same UUID, and the salt uses the canonical string.
    alt = UUID("{3F2504E0-4F89-11D3-9A0C-0305E82C3301}")
    assert derive_marble_key(ROOT_SECRET, alt, "k", "t", 128, disable_binding=False) == derive_marble_key(
        ROOT_SECRET, UID, "k", "t", 128, disable_binding=False
    )


def test_derivation_limits() -> None:
    assert len(derive_marble_key(ROOT_SECRET, UID, "k", "t", 255 * 32 * 8, disable_binding=False)) == 255 * 32
    for size in (0, 12, -8, 255 * 32 * 8 + 8):
        with pytest.raises(ManifestError, match=r"Secrets\.k\.Size"):
            derive_marble_key(ROOT_SECRET, UID, "k", "t", size, disable_binding=False)
    nil = UUID(int=0)
    with pytest.raises(ActivationRefused, match="nil UUID"):
        derive_marble_key(ROOT_SECRET, nil, "k", "t", 128, disable_binding=False)
    with pytest.raises(ActivationRefused, match="nil UUID"):
        derive_seal_key(SEAL_MASTER, nil)


def test_generate_symmetric_key_uses_rng() -> None:
    calls: list[int] = []

    def rng(n: int) -> bytes:
        calls.append(n)
        return b"\x07" * n

    assert generate_symmetric_key(256, rng) == b"\x07" * 32
    assert calls == [32]
    assert len(generate_symmetric_key(128)) == 16
    assert generate_symmetric_key(128) != generate_symmetric_key(128)
    with pytest.raises(ManifestError, match="multiple of 8"):
        generate_symmetric_key(100)


def test_legacy_root_secret_is_fixed_length_scalar() -> None:
    root, _, _ = pki()
    value = legacy_root_secret(root.key)
    assert len(value) == 48
    assert int.from_bytes(value, "big") == root.key.private_numbers().private_value


# ---------------------------------------------------------------- symmetric keys: properties

uuids = st.uuids().filter(lambda u: u.int != 0)
names = st.text(min_size=1, max_size=20)
types = st.text(min_size=1, max_size=20)
sizes = st.sampled_from([8, 128, 256, 512])


@settings(max_examples=150, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), uid=uuids, name=names, mtype=types, size=sizes)
def test_derivation_is_deterministic(secret: bytes, uid: UUID, name: str, mtype: str, size: int) -> None:
    a = derive_marble_key(secret, uid, name, mtype, size, disable_binding=False)
    b = derive_marble_key(secret, uid, name, mtype, size, disable_binding=False)
    assert a == b and len(a) == size // 8
    assert derive_seal_key(secret, uid) == derive_seal_key(secret, uid)


@settings(max_examples=150, deadline=None)
@given(u1=uuids, u2=uuids, name=names, mtype=types)
def test_derivation_differs_per_uuid(u1: UUID, u2: UUID, name: str, mtype: str) -> None:
    if u1 == u2:
        return
    assert derive_marble_key(ROOT_SECRET, u1, name, mtype, 256, disable_binding=False) != derive_marble_key(
        ROOT_SECRET, u2, name, mtype, 256, disable_binding=False
    )
    assert derive_marble_key(ROOT_SECRET, u1, name, mtype, 256, disable_binding=True) != derive_marble_key(
        ROOT_SECRET, u2, name, mtype, 256, disable_binding=True
    )
    assert derive_seal_key(SEAL_MASTER, u1) != derive_seal_key(SEAL_MASTER, u2)


@settings(max_examples=150, deadline=None)
@given(uid=uuids, n1=names, n2=names, t1=types, t2=types)
def test_derivation_binding(uid: UUID, n1: str, n2: str, t1: str, t2: str) -> None:
    if n1 != n2:
        assert derive_marble_key(ROOT_SECRET, uid, n1, t1, 256, disable_binding=False) != derive_marble_key(
            ROOT_SECRET, uid, n2, t1, 256, disable_binding=False
        )
    if t1 != t2:
        assert derive_marble_key(ROOT_SECRET, uid, n1, t1, 256, disable_binding=False) != derive_marble_key(
            ROOT_SECRET, uid, n1, t2, 256, disable_binding=False
        )
    # Binding disabled: the type does not matter.
    assert derive_marble_key(ROOT_SECRET, uid, n1, t1, 256, disable_binding=True) == derive_marble_key(
        ROOT_SECRET, uid, n1, t2, 256, disable_binding=True
    )


@settings(max_examples=100, deadline=None)
@given(uid=uuids, name=names, mtype=types)
def test_seal_key_independent_of_root_secret(uid: UUID, name: str, mtype: str) -> None:
    # Rotating the root secret never changes a seal key; and the two keys never coincide.
    seal = derive_seal_key(SEAL_MASTER, uid)
    assert seal != derive_marble_key(SEAL_MASTER, uid, name, mtype, 256, disable_binding=True)
    assert len(seal) == 32


# ---------------------------------------------------------------- certificate secrets


def test_cert_secret_defaults() -> None:
    _, _, marble_root = pki()
    secret = Secret(type=SecretType.CERT_ECDSA, size=256)
    out = generate_cert_secret(secret, marble_root, NOW, keep_not_after=False)
    cert = cert_of(out)
    assert out.valid_for == 365
    assert cert.subject.rfc4514_string() == "CN=localhost"
    assert cert.issuer == marble_root.cert.subject
    assert cert.signature_hash_algorithm is not None and cert.signature_hash_algorithm.name == "sha384"
    san = ext(cert, x509.SubjectAlternativeName)
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == LOOPBACK
    ku = ext(cert, x509.KeyUsage)
    assert isinstance(ku, x509.KeyUsage)
    assert ku.digital_signature and ku.key_cert_sign and not ku.key_encipherment
    eku = ext(cert, x509.ExtendedKeyUsage)
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    bc = ext(cert, x509.BasicConstraints)
    assert isinstance(bc, x509.BasicConstraints) and not bc.ca
    assert cert.not_valid_before_utc == NOW
    assert cert.not_valid_after_utc == NOW + dt.timedelta(days=365)
    # Stored encodings: PKCS#8 private, PKIX public, both matching the certificate.
    key = serialization.load_der_private_key(out.private, password=None)
    assert key.public_key() == cert.public_key()
    assert serialization.load_der_public_key(out.public) == cert.public_key()


def test_cert_secret_common_name_default_with_several_dns_names() -> None:
    _, _, marble_root = pki()
    template = CertTemplate(dns_names=("a.example", "b.example"))
    out = generate_cert_secret(
        Secret(type=SecretType.CERT_ED25519, cert_template=template), marble_root, NOW, keep_not_after=False
    )
    assert cert_of(out).subject.rfc4514_string() == f"CN={DEFAULT_CERT_COMMON_NAME}"


def test_cert_secret_template_fields() -> None:
    _, _, marble_root = pki()
    template = CertTemplate(
        common_name="svc",
        organization=("Org A", "Org B"),
        country=("DE",),
        serial_number="42",
        dns_names=("svc.example",),
        ip_addresses=("10.1.2.3",),
        email_addresses=("ops@example.com",),
        uris=("spiffe://example/svc",),
        key_usage=1 | 4,  # DigitalSignature | KeyEncipherment
        ext_key_usage=(1, 3, 10),
    )
    out = generate_cert_secret(
        Secret(type=SecretType.CERT_RSA, size=2048, valid_for=7, cert_template=template),
        marble_root,
        NOW,
        keep_not_after=False,
    )
    cert = cert_of(out)
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)
    assert cert.public_key().key_size == 2048  # type: ignore[union-attr]
    # Go's RDN order: C, O (one multi-valued RDN), CN, SERIALNUMBER.
    rdns = list(cert.subject.rdns)
    assert [a.oid for a in rdns[0]] == [NameOID.COUNTRY_NAME]
    assert sorted(a.value for a in rdns[1]) == ["Org A", "Org B"]
    assert [(a.oid, a.value) for a in rdns[2]] == [(NameOID.COMMON_NAME, "svc")]
    assert [(a.oid, a.value) for a in rdns[3]] == [(NameOID.SERIAL_NUMBER, "42")]
    san = ext(cert, x509.SubjectAlternativeName)
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["svc.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert san.get_values_for_type(x509.RFC822Name) == ["ops@example.com"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example/svc"]
    ku = ext(cert, x509.KeyUsage)
    assert isinstance(ku, x509.KeyUsage)
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = ext(cert, x509.ExtendedKeyUsage)
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert [o.dotted_string for o in eku] == [
        "1.3.6.1.5.5.7.3.1",
        "1.3.6.1.5.5.7.3.3",
        "1.3.6.1.4.1.311.10.3.3",
    ]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=7)
    assert out.valid_for == 7
    # The certificate is its own template: reading it back gives the same fields.
    back = cert_template_from_certificate(cert)
    assert back.common_name == "svc" and back.organization in (("Org A", "Org B"), ("Org B", "Org A"))
    assert back.key_usage == 5 and back.ext_key_usage == (1, 3, 10)
    assert back.dns_names == ("svc.example",) and back.ip_addresses == ("10.1.2.3",)


def test_cert_secret_not_after_rules() -> None:
    _, _, marble_root = pki()
    later = NOW + dt.timedelta(days=30)
    # Explicit NotAfter in the manifest (ValidFor 0): kept.
    explicit = Secret(type=SecretType.CERT_ECDSA, size=256, cert_template=CertTemplate(not_after=later))
    out = generate_cert_secret(explicit, marble_root, NOW, keep_not_after=False)
    assert cert_of(out).not_valid_after_utc == later and out.valid_for == 0
    # A stored certificate (NotAfter set, ValidFor 365) as template:
    stored = generate_cert_secret(
        Secret(type=SecretType.CERT_ECDSA, size=256, valid_for=7), marble_root, NOW, keep_not_after=False
    )
    tomorrow = NOW + dt.timedelta(days=1)
    per_marble = generate_cert_secret(stored, marble_root, tomorrow, keep_not_after=False)
    assert cert_of(per_marble).not_valid_after_utc == tomorrow + dt.timedelta(days=7)  # reset
    shared = generate_cert_secret(stored, marble_root, tomorrow, keep_not_after=True)
    assert cert_of(shared).not_valid_after_utc == NOW + dt.timedelta(days=7)  # kept
    assert cert_of(shared).not_valid_before_utc == tomorrow
    # A kept NotAfter that has passed is renewed rather than producing an expired certificate.
    much_later = NOW + dt.timedelta(days=30)
    renewed = generate_cert_secret(stored, marble_root, much_later, keep_not_after=True)
    assert cert_of(renewed).not_valid_after_utc == much_later + dt.timedelta(days=7)
    # An explicit NotAfter in the past is a manifest error.
    past = Secret(
        type=SecretType.CERT_ECDSA, size=256, cert_template=CertTemplate(not_after=NOW - dt.timedelta(days=1))
    )
    with pytest.raises(ManifestError, match="NotAfter"):
        generate_cert_secret(past, marble_root, NOW, keep_not_after=False)


def test_cert_secret_from_stored_cert_is_fresh() -> None:
    _, _, marble_root = pki()
    template = CertTemplate(common_name="x", dns_names=("x.example",))
    stored = generate_cert_secret(
        Secret(type=SecretType.CERT_ECDSA, size=384, cert_template=template),
        marble_root,
        NOW,
        keep_not_after=False,
    )
    again = generate_cert_secret(stored, marble_root, NOW, keep_not_after=False)
    assert again.private != stored.private and again.cert != stored.cert
    assert cert_of(again).serial_number != cert_of(stored).serial_number
    assert cert_of(again).subject == cert_of(stored).subject
    san = ext(cert_of(again), x509.SubjectAlternativeName)
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["x.example"]


@pytest.mark.parametrize(
    ("secret", "field"),
    [
        (Secret(type=SecretType.CERT_ECDSA, size=512), "Size"),
        (Secret(type=SecretType.CERT_ECDSA, size=0), "Size"),
        (Secret(type=SecretType.CERT_ED25519, size=384), "Size"),
        (Secret(type=SecretType.CERT_RSA, size=0), "Size"),
        (Secret(type=SecretType.CERT_RSA, size=1024), "Size"),
        (Secret(type=SecretType.CERT_ED25519, cert_template=CertTemplate(key_usage=1024)), "KeyUsage"),
        (Secret(type=SecretType.CERT_ED25519, cert_template=CertTemplate(key_usage=128)), "KeyUsage"),
        (
            Secret(type=SecretType.CERT_ED25519, cert_template=CertTemplate(ext_key_usage=(1, 99))),
            "ExtKeyUsage",
        ),
        (
            Secret(type=SecretType.CERT_ED25519, cert_template=CertTemplate(ip_addresses=("nope",))),
            "IPAddresses",
        ),
        (Secret(type=SecretType.CERT_ED25519, cert_template=CertTemplate(country=("Germany",))), "Subject"),
    ],
)
def test_cert_secret_bad_definitions(secret: Secret, field: str) -> None:
    _, _, marble_root = pki()
    with pytest.raises(ManifestError) as info:
        generate_shared_secrets({"mysecret": dataclasses.replace(secret, shared=True)}, marble_root, NOW)
    assert "Secrets.mysecret" in str(info.value) and field in str(info.value)
    assert info.value.problems and info.value.problems[0].path.startswith("Secrets.mysecret")


@needs_openssl
@pytest.mark.parametrize(
    ("secret_type", "size", "key_type"),
    [
        (SecretType.CERT_RSA, 2048, rsa.RSAPublicKey),
        (SecretType.CERT_ECDSA, 224, ec.EllipticCurvePublicKey),
        (SecretType.CERT_ECDSA, 256, ec.EllipticCurvePublicKey),
        (SecretType.CERT_ECDSA, 384, ec.EllipticCurvePublicKey),
        (SecretType.CERT_ECDSA, 521, ec.EllipticCurvePublicKey),
        (SecretType.CERT_ED25519, 0, ed25519.Ed25519PublicKey),
    ],
)
def test_cert_secrets_verify_with_openssl(
    tmp_path: Path, secret_type: SecretType, size: int, key_type: type[object]
) -> None:
    root, intermediate, marble_root = pki()
    template = CertTemplate(dns_names=("db.example",), ip_addresses=("10.9.8.7",), key_usage=1 | 16)
    secret = Secret(type=secret_type, size=size, valid_for=7, cert_template=template)
    out = generate_cert_secret(secret, marble_root, NOW, keep_not_after=False)
    cert = cert_of(out)
    assert isinstance(cert.public_key(), key_type)
    if secret_type is SecretType.CERT_ECDSA:
        assert cert.public_key().key_size == size  # type: ignore[union-attr]
    assert cert.not_valid_before_utc == NOW  # NotBefore = now, no backdating
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=7)

    paths = {}
    for label, data in (
        ("root", root.cert_pem),
        ("inter", intermediate.cert_pem),
        ("mroot", marble_root.cert_pem),
        ("secret", der_to_pem(out.cert or b"", "CERTIFICATE")),
    ):
        (tmp_path / f"{label}.pem").write_bytes(data)
        paths[label] = str(tmp_path / f"{label}.pem")
    res = openssl("verify", "-CAfile", paths["mroot"], "-verify_hostname", "db.example", paths["secret"])
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr
    res = openssl(
        "verify",
        "-CAfile",
        paths["root"],
        "-untrusted",
        paths["inter"],
        "-verify_ip",
        "10.9.8.7",
        paths["secret"],
    )
    assert res.returncode == 0, res.stdout + res.stderr
    text = openssl("x509", "-in", paths["secret"], "-noout", "-text").stdout
    assert "Digital Signature, Key Agreement" in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    assert "DNS:db.example" in text and "IP Address:10.9.8.7" in text
    assert "ecdsa-with-SHA384" in text


@needs_openssl
def test_ca_secret_can_sign_a_leaf_that_verifies(tmp_path: Path) -> None:
    _, _, marble_root = pki()
    ca_secret = generate_cert_secret(
        Secret(type=SecretType.CERT_ED25519, cert_template=CertTemplate(common_name="sub CA", is_ca=True)),
        marble_root,
        NOW,
        keep_not_after=False,
    )
    ca_cert = cert_of(ca_secret)
    bc = ext(ca_cert, x509.BasicConstraints)
    assert isinstance(bc, x509.BasicConstraints) and bc.ca and bc.path_length is None
    assert ext(ca_cert, x509.SubjectKeyIdentifier) == x509.SubjectKeyIdentifier.from_public_key(
        ca_cert.public_key()  # type: ignore[arg-type]
    )
    ca_key = serialization.load_der_private_key(ca_secret.private, password=None)
    assert isinstance(ca_key, ed25519.Ed25519PrivateKey)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf.example")]))
        .issuer_name(ca_cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(7)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=1))
        .sign(ca_key, None)
    )
    (tmp_path / "mroot.pem").write_bytes(marble_root.cert_pem)
    (tmp_path / "ca.pem").write_bytes(der_to_pem(ca_secret.cert or b"", "CERTIFICATE"))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    res = openssl(
        "verify",
        "-CAfile",
        str(tmp_path / "mroot.pem"),
        "-untrusted",
        str(tmp_path / "ca.pem"),
        str(tmp_path / "leaf.pem"),
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


def test_ca_secret_path_length() -> None:
    _, _, marble_root = pki()
    zero = generate_cert_secret(
        Secret(type=SecretType.CERT_ED25519, cert_template=CertTemplate(is_ca=True, max_path_len_zero=True)),
        marble_root,
        NOW,
        keep_not_after=False,
    )
    bc = ext(cert_of(zero), x509.BasicConstraints)
    assert isinstance(bc, x509.BasicConstraints) and bc.path_length == 0
    two = generate_cert_secret(
        Secret(type=SecretType.CERT_ED25519, cert_template=CertTemplate(is_ca=True, max_path_len=2)),
        marble_root,
        NOW,
        keep_not_after=False,
    )
    bc = ext(cert_of(two), x509.BasicConstraints)
    assert isinstance(bc, x509.BasicConstraints) and bc.path_length == 2


# ---------------------------------------------------------------- generators: selection


DEFS = {
    "shared_key": Secret(type=SecretType.SYMMETRIC_KEY, size=128, shared=True),
    "shared_cert": Secret(type=SecretType.CERT_ED25519, shared=True),
    "own_key": Secret(type=SecretType.SYMMETRIC_KEY, size=256),
    "own_cert": Secret(type=SecretType.CERT_ECDSA, size=256),
    "user_key": Secret(type=SecretType.SYMMETRIC_KEY, size=128, user_defined=True),
    "user_plain": Secret(type=SecretType.PLAIN, user_defined=True),
    "user_cert": Secret(type=SecretType.CERT_ECDSA, size=256, user_defined=True, shared=True),
}


def test_generate_shared_secrets_selects_shared_generated_only() -> None:
    _, _, marble_root = pki()
    out = generate_shared_secrets(DEFS, marble_root, NOW, rng=lambda n: b"\xab" * n)
    assert set(out) == {"shared_key", "shared_cert"}
    assert out["shared_key"].private == out["shared_key"].public == b"\xab" * 16
    assert out["shared_key"].shared and out["shared_key"].size == 128
    assert cert_of(out["shared_cert"]).issuer == marble_root.cert.subject
    assert out["shared_cert"].valid_for == 365


def test_generate_marble_secrets_selects_per_marble_only() -> None:
    _, _, marble_root = pki()
    kwargs = {
        "root_secret": ROOT_SECRET,
        "marble_type": "backend",
        "disable_binding": False,
        "issuer": marble_root,
        "now": NOW,
    }
    a = generate_marble_secrets(DEFS, uuid=UID, **kwargs)  # type: ignore[arg-type]
    b = generate_marble_secrets(DEFS, uuid=UID, **kwargs)  # type: ignore[arg-type]
    c = generate_marble_secrets(DEFS, uuid=uuid4(), **kwargs)  # type: ignore[arg-type]
    assert set(a) == {"own_key", "own_cert"}
    assert a["own_key"].private == derive_marble_key(
        ROOT_SECRET, UID, "own_key", "backend", 256, disable_binding=False
    )
    assert a["own_key"].private == a["own_key"].public == b["own_key"].private  # stable per UUID
    assert c["own_key"].private != a["own_key"].private
    assert a["own_cert"].private != b["own_cert"].private  # fresh certificate each time
    with pytest.raises(ActivationRefused):
        generate_marble_secrets(DEFS, uuid=UUID(int=0), **kwargs)  # type: ignore[arg-type]


def test_generated_plain_is_refused() -> None:
    _, _, marble_root = pki()
    with pytest.raises(ManifestError, match="plain") as info:
        generate_shared_secrets({"p": Secret(type=SecretType.PLAIN, shared=True)}, marble_root, NOW)
    assert info.value.problems[0].path == "Secrets.p.UserDefined"
    with pytest.raises(ManifestError, match="plain"):
        generate_marble_secrets(
            {"p": Secret(type=SecretType.PLAIN)},
            root_secret=ROOT_SECRET,
            uuid=UID,
            marble_type="t",
            disable_binding=False,
            issuer=marble_root,
            now=NOW,
        )
    with pytest.raises(ManifestError, match=r"Secrets\.k\.Size"):
        generate_shared_secrets(
            {"k": Secret(type=SecretType.SYMMETRIC_KEY, size=0, shared=True)}, marble_root, NOW
        )
