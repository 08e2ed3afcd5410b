"""Manifest signature: ECDSA P-384 over SHA-256 of the raw bytes, verifiable with openssl."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from marblekeep.crypto.pki import create_root_ca
from marblekeep.crypto.signing import sign_manifest, verify_manifest_signature

NOW = dt.datetime.now(dt.UTC)
RAW = b'{"Packages":{"backend":{"SignerID":"00","ProductID":1,"SecurityVersion":1}},\n "Marbles":{}}\n'


def test_signature_is_der_ecdsa_sha256_by_root_key() -> None:
    root = create_root_ca(["localhost"], NOW)
    sig = sign_manifest(root.key, RAW)
    r, s = decode_dss_signature(sig)  # DER SEQUENCE{r, s}
    assert r > 0 and s > 0
    root.key.public_key().verify(sig, RAW, ec.ECDSA(hashes.SHA256()))
    assert verify_manifest_signature(root.cert, RAW, sig)
    # Over the raw bytes: any change, even whitespace, fails.
    assert not verify_manifest_signature(root.cert, RAW.replace(b"\n ", b""), sig)
    assert not verify_manifest_signature(root.cert, RAW, sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not verify_manifest_signature(root.cert, RAW, b"not a signature")
    other = create_root_ca(["localhost"], NOW)
    assert not verify_manifest_signature(other.cert, RAW, sig)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_openssl_dgst_verifies_manifest_signature(tmp_path: Path) -> None:
    root = create_root_ca(["localhost"], NOW)
    pub = root.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "pub.pem").write_bytes(pub)
    (tmp_path / "sig").write_bytes(sign_manifest(root.key, RAW))
    (tmp_path / "manifest.json").write_bytes(RAW)
    (tmp_path / "tampered.json").write_bytes(RAW + b" ")
    cmd = [
        "openssl",
        "dgst",
        "-sha256",
        "-verify",
        str(tmp_path / "pub.pem"),
        "-signature",
        str(tmp_path / "sig"),
    ]
    ok = subprocess.run([*cmd, str(tmp_path / "manifest.json")], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "Verified OK" in ok.stdout, ok.stdout + ok.stderr
    bad = subprocess.run([*cmd, str(tmp_path / "tampered.json")], capture_output=True, text=True, check=False)
    assert bad.returncode != 0
