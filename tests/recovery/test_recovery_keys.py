"""Recovery secrets at SetManifest: single key, XOR multi-party, Shamir threshold; openssl interop."""

from __future__ import annotations

import json
import shutil
import subprocess
from hashlib import sha256
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from marblekeep.errors import ManifestError
from marblekeep.recovery import (
    combine,
    decrypt_recovery_secret,
    generate_recovery_keys,
    recovery_data_for,
    recovery_keys_changed,
)


@pytest.fixture(scope="module")
def owners() -> dict[str, rsa.RSAPrivateKey]:
    return {
        name: rsa.generate_private_key(public_exponent=65537, key_size=2048)
        for name in ("alice", "bob", "carol")
    }


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def pems(owners: dict[str, rsa.RSAPrivateKey], names: list[str]) -> dict[str, str]:
    return {n: public_pem(owners[n]) for n in names}


def xor(parts: list[bytes]) -> bytes:
    out = bytes(len(parts[0]))
    for p in parts:
        out = bytes(a ^ b for a, b in zip(out, p, strict=True))
    return out


def test_single_key_gets_the_dek(owners: dict[str, rsa.RSAPrivateKey]) -> None:
    material = generate_recovery_keys(pems(owners, ["alice"]), 0)
    assert len(material.dek) == 32 and material.recovery_data is None
    assert set(material.secrets) == {"alice"}
    assert decrypt_recovery_secret(material.secrets["alice"], owners["alice"]) == material.dek
    assert material.dek.hex() not in repr(material)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_recovery_secret_decrypts_with_openssl(owners: dict[str, rsa.RSAPrivateKey], tmp_path: Path) -> None:
    material = generate_recovery_keys(pems(owners, ["alice"]), 0)
    key_file = tmp_path / "k.pem"
    key_file.write_bytes(
        owners["alice"].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    secret_file = tmp_path / "secret.bin"
    secret_file.write_bytes(material.secrets["alice"])
    out = subprocess.run(
        [
            "openssl",
            "pkeyutl",
            "-decrypt",
            "-inkey",
            str(key_file),
            "-in",
            str(secret_file),
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            "rsa_oaep_md:sha256",
        ],
        capture_output=True,
        check=True,
    )
    assert out.stdout == material.dek


def test_no_keys_means_no_secrets() -> None:
    material = generate_recovery_keys({}, 0)
    assert material.secrets == {} and material.recovery_data is None and len(material.dek) == 32


@pytest.mark.parametrize(
    ("names", "threshold"), [(["alice", "bob"], 0), (["alice", "bob"], 2), (["alice", "bob", "carol"], 3)]
)
def test_xor_multi_party(owners: dict[str, rsa.RSAPrivateKey], names: list[str], threshold: int) -> None:
    material = generate_recovery_keys(pems(owners, names), threshold)
    shares = [decrypt_recovery_secret(material.secrets[n], owners[n]) for n in names]
    assert all(len(s) == 32 for s in shares)
    assert xor(shares) == material.dek
    assert xor(shares[:-1]) != material.dek
    assert material.recovery_data == recovery_data_for(shares)
    parsed = json.loads(material.recovery_data or b"")
    assert parsed == {sha256(s).hexdigest(): True for s in shares}
    # Go's json.Marshal: sorted keys, no spaces
    assert material.recovery_data == json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()


def test_shamir_two_of_three(owners: dict[str, rsa.RSAPrivateKey]) -> None:
    names = ["alice", "bob", "carol"]
    material = generate_recovery_keys(pems(owners, names), 2)
    shares = {n: decrypt_recovery_secret(material.secrets[n], owners[n]) for n in names}
    assert all(len(s) == 33 for s in shares.values())
    for a, b in [("alice", "bob"), ("bob", "carol"), ("carol", "alice")]:
        assert combine([shares[a], shares[b]]) == material.dek
    assert set(json.loads(material.recovery_data or b"")) == {sha256(s).hexdigest() for s in shares.values()}


def test_every_call_makes_a_new_dek(owners: dict[str, rsa.RSAPrivateKey]) -> None:
    keys = pems(owners, ["alice"])
    assert generate_recovery_keys(keys).dek != generate_recovery_keys(keys).dek


def test_bad_keys_and_thresholds(owners: dict[str, rsa.RSAPrivateKey]) -> None:
    keys = pems(owners, ["alice", "bob"])
    with pytest.raises(ManifestError, match="at least 2"):
        generate_recovery_keys(keys, 1)
    with pytest.raises(ManifestError, match="not enough recovery keys"):
        generate_recovery_keys(keys, 3)
    pkcs1 = (
        owners["alice"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
        .decode()
    )
    with pytest.raises(ManifestError, match="given PEM data is not a public key") as info:
        generate_recovery_keys({"alice": pkcs1})
    assert info.value.problems[0].path == "RecoveryKeys.alice"
    with pytest.raises(ManifestError, match="not a public key"):
        generate_recovery_keys({"x": "not pem at all"})
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(ManifestError, match="RSA"):
        generate_recovery_keys({"ec": ec_pem})
    broken = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
    with pytest.raises(ManifestError, match="cannot be parsed"):
        generate_recovery_keys({"broken": broken})


def test_recovery_keys_changed_follows_marblerun() -> None:
    a, b, c = {"a": "A"}, {"a": "A", "b": "B"}, {"a": "A", "b": "B2"}
    assert recovery_keys_changed(a, 0, b, 0)  # different count
    assert not recovery_keys_changed(b, 0, dict(b), 0)
    assert not recovery_keys_changed(b, 0, dict(b), 2)  # 0 and n are equivalent
    assert recovery_keys_changed(b, 0, c, 0)  # a key changed
    assert recovery_keys_changed({"a": "A", "b": "B", "c": "C"}, 2, {"a": "A", "b": "B", "c": "C"}, 3)
    assert not recovery_keys_changed({}, 0, {}, 0)
