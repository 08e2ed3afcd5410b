"""PKI: root CA, intermediate / Marble root, Marble leaves — checked with cryptography and openssl."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import subprocess
from functools import cache
from pathlib import Path
from uuid import UUID, uuid4

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from marblekeep.crypto.pki import (
    INTERMEDIATE_COMMON_NAME,
    MARBLE_TYPE_OID,
    ROOT_COMMON_NAME,
    CertifiedKey,
    LeafIssuer,
    create_intermediate,
    create_root_ca,
    der_to_pem,
    leaf_floor,
    marble_identity,
    random_serial,
)
from marblekeep.errors import AuthenticationError, ConfigError, IntegrityError, RequestError

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
LOOPBACK = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


@cache
def pki() -> tuple[CertifiedKey, CertifiedKey, CertifiedKey]:
    root = create_root_ca(["coordinator.example", "10.0.0.7", "localhost"], NOW)
    intermediate, marble_root = create_intermediate(
        root, ["coordinator.example", "10.0.0.7", "localhost"], NOW
    )
    return root, intermediate, marble_root


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30, check=False)


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


# ---------------------------------------------------------------- CA certificates


def test_root_ca_fields() -> None:
    root, _, _ = pki()
    cert = root.cert
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == f"CN={ROOT_COMMON_NAME}"
    assert isinstance(root.key.curve, ec.SECP384R1)
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha384"
    assert cert.not_valid_before_utc == NOW
    # Go: now + MaxInt64 ns ≈ 292 years, 9223372036 s after notBefore.
    assert (cert.not_valid_after_utc - NOW).total_seconds() == 9223372036
    assert cert.not_valid_after_utc.year > 2300
    assert 1 <= cert.serial_number < 2**128

    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length is None
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_cert_sign
    assert not ku.value.key_agreement and not ku.value.crl_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    names = san(cert)
    assert names.get_values_for_type(x509.DNSName) == ["coordinator.example", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [*LOOPBACK, ipaddress.ip_address("10.0.0.7")]
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(root.key.public_key())
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)


def test_intermediate_and_marble_root_share_one_key() -> None:
    root, intermediate, marble_root = pki()
    assert intermediate.key is marble_root.key
    assert intermediate.cert.public_key() == marble_root.cert.public_key()
    assert intermediate.cert.public_key() != root.cert.public_key()
    for ck in (intermediate, marble_root):
        assert ck.cert.subject.rfc4514_string() == f"CN={INTERMEDIATE_COMMON_NAME}"
        assert ck.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert ck.cert.not_valid_after_utc.year > 2300
    assert intermediate.cert.issuer == root.cert.subject
    assert marble_root.cert.issuer == marble_root.cert.subject
    intermediate.cert.verify_directly_issued_by(root.cert)
    marble_root.cert.verify_directly_issued_by(marble_root.cert)
    aki = intermediate.cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = root.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    assert intermediate.cert.serial_number != marble_root.cert.serial_number


def test_certified_key_caches_der_and_pem() -> None:
    root, _, _ = pki()
    assert root.cert_der == root.cert.public_bytes(serialization.Encoding.DER)
    assert root.cert_pem == root.cert.public_bytes(serialization.Encoding.PEM)
    assert "key=" not in repr(root)


def test_der_to_pem_matches_cryptography_for_keys() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert der_to_pem(der, "PRIVATE KEY") == pem


def test_certified_key_from_der_roundtrip_and_damage() -> None:
    root, intermediate, _ = pki()
    loaded = CertifiedKey.from_der(root.cert_der, root.key_pkcs8_der())
    assert loaded.cert_der == root.cert_der
    assert loaded.key.private_numbers() == root.key.private_numbers()
    with pytest.raises(IntegrityError, match="does not match"):
        CertifiedKey.from_der(root.cert_der, intermediate.key_pkcs8_der())
    with pytest.raises(IntegrityError, match="cannot be parsed"):
        CertifiedKey.from_der(b"\x30\x03garbage", root.key_pkcs8_der())
    p256 = ec.generate_private_key(ec.SECP256R1())
    p256_der = p256.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(IntegrityError, match="P-384"):
        CertifiedKey.from_der(root.cert_der, p256_der)


def test_root_rejects_bad_dns_names() -> None:
    with pytest.raises(ConfigError, match=r"\[1\]"):
        create_root_ca(["localhost", ""], NOW)
    with pytest.raises(ConfigError, match="not a valid DNS name"):
        create_root_ca(["bad name"], NOW)


def test_random_serial_range_and_zero_redraw() -> None:
    draws = iter([b"\x00" * 16, b"\xff" * 16])
    assert random_serial(lambda n: next(draws)) == 2**128 - 1
    serials = {random_serial() for _ in range(50)}
    assert len(serials) == 50
    assert all(1 <= s < 2**128 for s in serials)


@needs_openssl
def test_root_parses_with_openssl_and_notafter_is_generalized_time(tmp_path: Path) -> None:
    root, _, _ = pki()
    out = openssl(
        "x509", "-in", write(tmp_path / "root.pem", root.cert_pem), "-noout", "-enddate", "-subject"
    )
    assert out.returncode == 0, out.stderr
    year = int(out.stdout.split("notAfter=")[1].split("GMT")[0].split()[-1])
    assert year > 2300
    assert "MarbleRun Coordinator" in out.stdout
    parsed = openssl("asn1parse", "-in", str(tmp_path / "root.pem"))
    assert parsed.returncode == 0, parsed.stderr
    assert "UTCTIME" in parsed.stdout and "GENERALIZEDTIME" in parsed.stdout


# ---------------------------------------------------------------- leaves


def test_leaf_fields() -> None:
    _, _, marble_root = pki()
    uid = UUID("3f2504e0-4f89-11d3-9a0c-0305e82c3301")
    leaf = LeafIssuer(marble_root).issue(uid, "backend-ü", ["backend", "backend.ns.svc", "192.168.1.5"], NOW)
    cert = x509.load_der_x509_certificate(leaf.cert_der)
    assert cert.subject.rfc4514_string() == "CN=3f2504e0-4f89-11d3-9a0c-0305e82c3301"
    assert cert.issuer == marble_root.cert.subject
    assert cert.signature_hash_algorithm is not None and cert.signature_hash_algorithm.name == "sha384"
    assert 1 <= cert.serial_number < 2**128
    assert cert.not_valid_before_utc == NOW
    ext = cert.extensions.get_extension_for_oid(MARBLE_TYPE_OID)
    assert not ext.critical
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    assert ext.value.value == "backend-ü".encode()  # raw UTF-8, not DER-wrapped
    names = san(cert)
    assert names.get_values_for_type(x509.DNSName) == ["backend", "backend.ns.svc"]
    assert names.get_values_for_type(x509.IPAddress) == [*LOOPBACK, ipaddress.ip_address("192.168.1.5")]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert (
        ku.critical and ku.value.digital_signature and ku.value.key_agreement and not ku.value.key_cert_sign
    )
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    mr_ski = marble_root.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == mr_ski.digest
    cert.verify_directly_issued_by(marble_root.cert)


def test_leaf_key_encodings_match_certificate() -> None:
    _, _, marble_root = pki()
    leaf = LeafIssuer(marble_root).issue(uuid4(), "frontend", ["localhost"], NOW)
    cert = x509.load_pem_x509_certificate(leaf.cert_pem)
    assert cert.public_bytes(serialization.Encoding.DER) == leaf.cert_der
    key = serialization.load_pem_private_key(leaf.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
    assert (
        serialization.load_der_private_key(leaf.key_pkcs8_der, password=None).public_key()
        == cert.public_key()
    )
    assert key.public_key() == cert.public_key()
    expected_spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert leaf.public_der == expected_spki
    assert leaf.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert leaf.key_pem == key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert b"PRIVATE" not in repr(leaf).encode()


def test_two_issues_give_different_keys_and_serials() -> None:
    _, _, marble_root = pki()
    issuer = LeafIssuer(marble_root)
    uid = uuid4()
    a = issuer.issue(uid, "backend", ["localhost"], NOW)
    b = issuer.issue(uid, "backend", ["localhost"], NOW)
    assert a.key_pkcs8_der != b.key_pkcs8_der
    assert a.public_der != b.public_der
    ca = x509.load_der_x509_certificate(a.cert_der)
    cb = x509.load_der_x509_certificate(b.cert_der)
    assert ca.serial_number != cb.serial_number


def test_leaf_rejects_bad_dns_names() -> None:
    _, _, marble_root = pki()
    issuer = LeafIssuer(marble_root)
    with pytest.raises(RequestError, match=r"dns_names\[0\]"):
        issuer.issue(uuid4(), "backend", ["has space"], NOW)
    with pytest.raises(RequestError, match=r"dns_names\[1\]"):
        issuer.issue(uuid4(), "backend", ["ok", ""], NOW)


def test_leaf_duplicate_loopback_ip_not_repeated() -> None:
    _, _, marble_root = pki()
    leaf = LeafIssuer(marble_root).issue(uuid4(), "backend", ["127.0.0.1", "::1"], NOW)
    cert = x509.load_der_x509_certificate(leaf.cert_der)
    assert san(cert).get_values_for_type(x509.IPAddress) == LOOPBACK
    assert san(cert).get_values_for_type(x509.DNSName) == []


def test_marble_identity() -> None:
    root, _, marble_root = pki()
    uid = uuid4()
    leaf = LeafIssuer(marble_root).issue(uid, "backend", ["localhost"], NOW)
    cert = x509.load_der_x509_certificate(leaf.cert_der)
    assert marble_identity(cert, marble_root.cert) == ("backend", uid)
    # A leaf from another Coordinator (another Marble root) is refused.
    _, other_root = create_intermediate(root, ["localhost"], NOW)
    with pytest.raises(AuthenticationError, match="Marble root"):
        marble_identity(cert, other_root.cert)
    # Signed by the Marble root key but without the type extension / with a non-UUID CN.
    key = ec.generate_private_key(ec.SECP384R1())
    base = (
        x509.CertificateBuilder()
        .issuer_name(marble_root.cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=1))
    )
    no_ext = base.subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(uid))])).sign(
        marble_root.key, hashes.SHA384()
    )
    with pytest.raises(AuthenticationError, match=r"1\.3\.9903\.2\.1"):
        marble_identity(no_ext, marble_root.cert)
    bad_cn = base.subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not-a-uuid")])).sign(
        marble_root.key, hashes.SHA384()
    )
    with pytest.raises(AuthenticationError, match="UUID"):
        marble_identity(bad_cn, marble_root.cert)


def test_leaf_floor_runs() -> None:
    _, _, marble_root = pki()
    assert leaf_floor(marble_root.key, NOW) is None


@needs_openssl
def test_openssl_verifies_leaf_chains(tmp_path: Path) -> None:
    root, intermediate, marble_root = pki()
    leaf = LeafIssuer(marble_root).issue(uuid4(), "backend", ["localhost", "backend.svc"], NOW)
    root_pem = write(tmp_path / "root.pem", root.cert_pem)
    inter_pem = write(tmp_path / "inter.pem", intermediate.cert_pem)
    mroot_pem = write(tmp_path / "mroot.pem", marble_root.cert_pem)
    leaf_pem = write(tmp_path / "leaf.pem", leaf.cert_pem)

    # Leaf → Marble root (MARBLE_PREDEFINED_ROOT_CA), as a self-signed trust anchor.
    out = openssl("verify", "-purpose", "sslserver", "-CAfile", mroot_pem, leaf_pem)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr
    # Leaf → intermediate → Coordinator root (MARBLE_PREDEFINED_MARBLE_CERTIFICATE_CHAIN).
    out = openssl("verify", "-purpose", "sslclient", "-CAfile", root_pem, "-untrusted", inter_pem, leaf_pem)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr
    # A client pinning only the intermediate.
    out = openssl("verify", "-partial_chain", "-CAfile", inter_pem, leaf_pem)
    assert out.returncode == 0, out.stdout + out.stderr
    # Hostname check against a DNS SAN.
    out = openssl("verify", "-CAfile", mroot_pem, "-verify_hostname", "backend.svc", leaf_pem)
    assert out.returncode == 0, out.stdout + out.stderr
    # Negative control: the Coordinator root alone (no intermediate) does not anchor the leaf.
    out = openssl("verify", "-CAfile", root_pem, leaf_pem)
    assert out.returncode != 0
