"""User-defined secret uploads (parse_user_secrets): every rule, all problems at once, no leaks."""

from __future__ import annotations

import base64
import datetime as dt
from functools import cache

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from marblekeep.core.usersecrets import parse_user_secrets
from marblekeep.errors import Problem, SecretUploadError
from marblekeep.manifest.model import Secret, SecretType

NOW = dt.datetime.now(dt.UTC)

STORED = {
    "userKey": Secret(type=SecretType.SYMMETRIC_KEY, size=128, user_defined=True),
    "badSizeKey": Secret(type=SecretType.SYMMETRIC_KEY, size=0, user_defined=True),
    "oddSizeKey": Secret(type=SecretType.SYMMETRIC_KEY, size=12, user_defined=True),
    "userCert": Secret(type=SecretType.CERT_ECDSA, size=256, user_defined=True),
    "userPlain": Secret(type=SecretType.PLAIN, user_defined=True),
    "generated": Secret(type=SecretType.SYMMETRIC_KEY, size=128, shared=True),
}

# Distinctive secret bytes that must never show up in an error.
KEY16 = bytes.fromhex("5ec7e7ba5ec7e7ba5ec7e7ba5ec7e7ba")
KEY15 = KEY16[:15]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@cache
def cert_and_key() -> tuple[bytes, bytes, bytes]:
    """(cert DER, PKCS#8 DER, SEC1 DER) of a self-signed P-256 certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "user cert")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    sec1 = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.DER), pkcs8, sec1


def problems_of(body: object) -> list[Problem]:
    with pytest.raises(SecretUploadError) as info:
        parse_user_secrets(body, STORED)
    assert info.value.http_status == 400
    return list(info.value.problems)


def paths(problems: list[Problem]) -> list[str]:
    return [p.path for p in problems]


# ---------------------------------------------------------------- accepted uploads


def test_symmetric_key_upload() -> None:
    out = parse_user_secrets({"userKey": {"Key": b64(KEY16)}}, STORED)
    assert out == {
        "userKey": Secret(
            type=SecretType.SYMMETRIC_KEY, size=128, user_defined=True, private=KEY16, public=KEY16
        )
    }


def test_field_names_are_case_insensitive_and_unknown_fields_ignored() -> None:
    out = parse_user_secrets({"userKey": {"kEY": b64(KEY16), "Whatever": 1}}, STORED)
    assert out["userKey"].private == KEY16
    # Go's []byte also decodes from an array of numbers.
    out = parse_user_secrets({"userKey": {"key": list(KEY16)}}, STORED)
    assert out["userKey"].public == KEY16


def test_certificate_upload_with_and_without_private() -> None:
    cert, pkcs8, sec1 = cert_and_key()
    out = parse_user_secrets({"userCert": {"Cert": b64(cert), "Private": b64(pkcs8)}}, STORED)
    secret = out["userCert"]
    assert secret.cert == cert and secret.private == pkcs8
    expected_public = (
        x509.load_der_x509_certificate(cert)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert secret.public == expected_public
    assert secret.type is SecretType.CERT_ECDSA and secret.size == 256 and secret.user_defined
    # SEC1 ("EC PRIVATE KEY" DER, what the CLI's --from-pem may store) is accepted as given.
    assert (
        parse_user_secrets({"userCert": {"Cert": b64(cert), "Private": b64(sec1)}}, STORED)[
            "userCert"
        ].private
        == sec1
    )
    # Private is optional.
    only_cert = parse_user_secrets({"userCert": {"Cert": b64(cert)}}, STORED)["userCert"]
    assert only_cert.private == b"" and only_cert.public == expected_public


def test_plain_upload_accepts_anything_even_empty() -> None:
    data = b"\x00arbitrary\xffbytes"
    assert parse_user_secrets({"userPlain": {"Key": b64(data)}}, STORED)["userPlain"].private == data
    empty = parse_user_secrets({"userPlain": {"Key": ""}}, STORED)["userPlain"]
    assert empty.private == empty.public == b""
    assert parse_user_secrets({"userPlain": {}}, STORED)["userPlain"].private == b""


def test_multi_secret_upload_returns_all() -> None:
    cert, _, _ = cert_and_key()
    out = parse_user_secrets(
        {"userKey": {"Key": b64(KEY16)}, "userCert": {"Cert": b64(cert)}, "userPlain": {"Key": b64(b"pw")}},
        STORED,
    )
    assert set(out) == {"userKey", "userCert", "userPlain"}


# ---------------------------------------------------------------- rejections


def test_empty_and_non_object_bodies() -> None:
    with pytest.raises(SecretUploadError, match="no new secrets defined"):
        parse_user_secrets({}, STORED)
    for body in ([], "x", None, 3):
        with pytest.raises(SecretUploadError, match="JSON object"):
            parse_user_secrets(body, STORED)


def test_unknown_and_not_writeable_names() -> None:
    found = problems_of(
        {"nope": {"Key": b64(KEY16)}, "generated": {"Key": b64(KEY16)}, "userkey": {"Key": ""}}
    )
    assert paths(found) == ["nope", "generated", "userkey"]
    assert "does not contain" in found[0].message
    assert "secret generated is not writeable" in found[1].message


@pytest.mark.parametrize(
    ("body", "expected_paths", "fragment"),
    [
        ({"userKey": {"Key": b64(KEY15)}}, ["userKey.Key"], "exactly 16 bytes"),
        ({"userKey": {}}, ["userKey.Key"], "required"),
        ({"badSizeKey": {"Key": b64(KEY16)}}, ["badSizeKey.Key"], "nonzero multiple of 8"),
        ({"oddSizeKey": {"Key": b64(KEY16)}}, ["oddSizeKey.Key"], "nonzero multiple of 8"),
        ({"userKey": {"Key": b64(KEY16), "Private": b64(KEY16)}}, ["userKey.Private"], "must not be set"),
        ({"userKey": {"Key": b64(KEY16), "Cert": b64(KEY16)}}, ["userKey.Cert"], "must not be set"),
        ({"userPlain": {"Key": "", "Cert": b64(KEY16)}}, ["userPlain.Cert"], "plain"),
        ({"userPlain": {"Private": b64(KEY16)}}, ["userPlain.Private"], "must not be set"),
        ({"userCert": {"Private": b64(KEY16)}}, ["userCert.Cert"], "required"),
        ({"userCert": {"Cert": b64(KEY16)}}, ["userCert.Cert"], "not a DER X.509 certificate"),
        (
            {"userCert": {"Cert": {"Subject": {"CommonName": "x"}}}},
            ["userCert.Cert"],
            "object",
        ),
        ({"userKey": {"Key": "not base64!"}}, ["userKey.Key"], "base64"),
        ({"userKey": {"Key": "AAE"}}, ["userKey.Key"], "base64"),  # missing padding
        ({"userKey": {"Key": [1, 300]}}, ["userKey.Key"], "0..255"),
        ({"userKey": {"Key": 12}}, ["userKey.Key"], "base64"),
        ({"userKey": "AAAA"}, ["userKey"], "must be an object"),
    ],
)
def test_rule_violations(body: object, expected_paths: list[str], fragment: str) -> None:
    found = problems_of(body)
    assert paths(found) == expected_paths
    assert fragment in found[0].message


def test_certificate_specific_rules() -> None:
    cert, pkcs8, _ = cert_and_key()
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    found = problems_of({"userCert": {"Cert": b64(cert), "Private": b64(other)}})
    assert paths(found) == ["userCert.Private"] and "does not belong" in found[0].message
    found = problems_of({"userCert": {"Cert": b64(cert), "Private": b64(b"\x30\x03abc")}})
    assert paths(found) == ["userCert.Private"] and "not a DER private key" in found[0].message
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    encrypted = rsa_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    found = problems_of({"userCert": {"Cert": b64(cert), "Private": b64(encrypted)}})
    assert paths(found) == ["userCert.Private"] and "encrypted" in found[0].message
    found = problems_of({"userCert": {"Cert": b64(cert), "Private": b64(pkcs8), "Key": b64(KEY16)}})
    assert paths(found) == ["userCert.Key"]


def test_all_problems_reported_at_once() -> None:
    cert, _, _ = cert_and_key()
    body = {
        "userKey": {"Key": b64(KEY15)},
        "userCert": {"Cert": b64(cert), "Key": b64(KEY16)},
        "userPlain": {"Cert": b64(cert)},
        "generated": {"Key": b64(KEY16)},
        "missing": {"Key": b64(KEY16)},
    }
    with pytest.raises(SecretUploadError) as info:
        parse_user_secrets(body, STORED)
    err = info.value
    assert paths(list(err.problems)) == [
        "userKey.Key",
        "userCert.Key",
        "userPlain.Cert",
        "generated",
        "missing",
    ]
    assert "5 problems" in err.message
    assert all(p.path in err.diagnostics() for p in err.problems)


def test_no_secret_bytes_in_messages() -> None:
    cert, _, _ = cert_and_key()
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    bad_b64 = b64(KEY16)[:-2] + "!!"
    bodies = [
        {"userKey": {"Key": b64(KEY15)}},
        {"userKey": {"Key": bad_b64}},
        {"userCert": {"Cert": b64(cert), "Private": b64(other)}},
        {"userCert": {"Cert": b64(KEY16), "Key": b64(KEY16)}},
        {"userPlain": {"Private": b64(KEY16), "Key": b64(KEY16)}},
        {"generated": {"Key": b64(KEY16)}},
    ]
    needles = [
        KEY16.hex(),
        KEY15.hex(),
        b64(KEY16),
        b64(KEY15),
        bad_b64,
        b64(other),
        other.hex()[:32],
        repr(KEY16)[2:20],
        repr(KEY15)[2:20],
    ]
    for body in bodies:
        with pytest.raises(SecretUploadError) as info:
            parse_user_secrets(body, STORED)
        text = "\n".join([str(info.value), info.value.diagnostics(), repr(info.value.problems)])
        for needle in needles:
            assert needle not in text, (body, needle)
