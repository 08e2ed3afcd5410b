"""MarbleRun's Client API documentation commands, run unchanged with real ``curl`` and ``openssl``
against an in-process Coordinator (reference §6.1, §6.3-§6.5).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from harness import STATUS_2, STATUS_3, RunningCoordinator, activation_manifest_bytes, iter_pems, last_pem

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("openssl") is None, reason="needs curl and openssl"
)


def curl(*args: str, cwd: Path | None = None) -> tuple[int, dict[str, str], bytes]:
    """Run curl; return (HTTP status, lower-cased response headers, body)."""
    proc = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "-D", "-", *args],
        capture_output=True,
        cwd=cwd,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    head, _, body = proc.stdout.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def jsend(body: bytes) -> dict[str, Any]:
    assert body.endswith(b"\n"), "JSend bodies end in a newline, like Go's JSON encoder"
    doc: dict[str, Any] = json.loads(body)
    return doc


@pytest.fixture
def root_pem(coordinator: RunningCoordinator, tmp_path: Path) -> Path:
    """root.pem as the docs obtain it: the last PEM of the quote endpoint's ``cert`` (fetched with -k)."""
    status, _, body = curl("-k", f"{coordinator.client_url}/api/v2/quote")
    assert status == 200
    path = tmp_path / "root.pem"
    path.write_text(last_pem(jsend(body)["data"]["cert"]))
    return path


def test_root_from_quote_is_the_coordinator_root(coordinator: RunningCoordinator, root_pem: Path) -> None:
    cert = x509.load_pem_x509_certificate(root_pem.read_bytes())
    assert cert == coordinator.coord.deployment.ca.root.cert
    assert cert.subject.rfc4514_string() == "CN=MarbleRun Coordinator"


def test_status_v2_and_v1_before_and_after_manifest(coordinator: RunningCoordinator, root_pem: Path) -> None:
    url = coordinator.client_url
    status, headers, body = curl("--cacert", str(root_pem), f"{url}/api/v2/status")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    doc = jsend(body)
    assert doc["status"] == "success"
    assert doc["data"]["code"] == 2
    assert doc["data"]["message"] == STATUS_2
    assert doc["data"]["simulation"] is True  # simulation says so in /status

    status, _, body = curl("--cacert", str(root_pem), f"{url}/status")
    assert status == 200
    assert jsend(body) == {"status": "success", "data": {"StatusCode": 2, "StatusMessage": STATUS_2}}

    coordinator.set_manifest()
    status, _, body = curl("--cacert", str(root_pem), f"{url}/api/v2/status")
    data = jsend(body)["data"]
    assert (data["code"], data["message"]) == (3, STATUS_3)
    status, _, body = curl("--cacert", str(root_pem), f"{url}/status")
    assert jsend(body)["data"] == {"StatusCode": 3, "StatusMessage": STATUS_3}


def test_quote_v2_with_urlsafe_nonce_and_v1(coordinator: RunningCoordinator, root_pem: Path) -> None:
    url = coordinator.client_url
    chain = coordinator.coord.certificate_chain_pem().decode()
    # bytes whose URL-safe base64 uses '-' and '_' (standard base64 would use '+' and '/')
    nonce = base64.urlsafe_b64encode(b"\xfb\xff\xbf\x00").decode()
    assert "-" in nonce and "_" in nonce and nonce.endswith("=")
    status, _, body = curl("--cacert", str(root_pem), f"{url}/api/v2/quote?nonce={nonce}")
    assert status == 200
    data = jsend(body)["data"]
    assert data["cert"] == chain
    pems = list(iter_pems(data["cert"]))
    assert len(pems) == 2
    assert (
        x509.load_pem_x509_certificate(pems[0].encode()) == coordinator.coord.deployment.ca.intermediate.cert
    )
    assert data["quote"] == ""  # simulation: no quote ...
    assert data["simulation"] is True  # ... and it says so

    status, _, body = curl("--cacert", str(root_pem), f"{url}/quote")
    assert status == 200
    assert jsend(body)["data"] == {"Cert": chain, "Quote": ""}


@pytest.mark.parametrize(
    "nonce",
    [
        "!!!!",  # not base64 at all
        "%2B%2F8%3D",  # '+/8=': standard, not URL-safe, base64
        "-_8",  # URL-safe but without the padding
        "AAAA%0A",  # trailing garbage
    ],
)
def test_quote_bad_nonce_is_400_fail(coordinator: RunningCoordinator, root_pem: Path, nonce: str) -> None:
    status, headers, body = curl(
        "--cacert", str(root_pem), f"{coordinator.client_url}/api/v2/quote?nonce={nonce}"
    )
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    doc = jsend(body)
    assert doc["status"] == "fail"
    assert "nonce" in doc["message"]
    assert "URL-safe base64" in doc["message"]


def test_manifest_v2_set_get_and_verify_signature_with_openssl(
    coordinator: RunningCoordinator, root_pem: Path, tmp_path: Path
) -> None:
    url = coordinator.client_url
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(activation_manifest_bytes())
    body_file = tmp_path / "set.json"
    body_file.write_text(json.dumps({"manifest": base64.b64encode(manifest.read_bytes()).decode()}))

    status, _, body = curl(
        "--cacert", str(root_pem), "--data-binary", f"@{body_file}", f"{url}/api/v2/manifest"
    )
    assert status == 200, body
    assert jsend(body) == {"status": "success", "data": {"RecoverySecrets": {}}}

    status, _, body = curl("--cacert", str(root_pem), f"{url}/api/v2/manifest")
    assert status == 200
    data = jsend(body)["data"]
    assert set(data) == {"manifestSignatureRootECDSA", "manifestFingerprint", "manifest"}
    assert base64.b64decode(data["manifest"]) == manifest.read_bytes()  # the raw bytes, not re-serialised
    assert data["manifestFingerprint"] == hashlib.sha256(manifest.read_bytes()).hexdigest()

    # The documented verification: root public key, signature, openssl dgst -sha256 -verify.
    pub = tmp_path / "pub.pem"
    subprocess.run(
        ["openssl", "x509", "-in", str(root_pem), "-pubkey", "-noout", "-out", str(pub)],
        check=True,
        timeout=30,
    )
    sig = tmp_path / "sig"
    sig.write_bytes(base64.b64decode(data["manifestSignatureRootECDSA"]))
    ok = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(pub), "-signature", str(sig), str(manifest)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ok.returncode == 0
    assert ok.stdout.strip() == "Verified OK"

    # A different manifest does not verify with that signature.
    other = tmp_path / "other.json"
    other.write_bytes(manifest.read_bytes() + b" ")
    bad = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(pub), "-signature", str(sig), str(other)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert bad.returncode != 0
    assert "Verification failure" in bad.stdout + bad.stderr

    # v1 GET shows the same with Go field names.
    status, _, body = curl("--cacert", str(root_pem), f"{url}/manifest")
    assert jsend(body)["data"] == {
        "ManifestSignatureRootECDSA": data["manifestSignatureRootECDSA"],
        "ManifestSignature": data["manifestFingerprint"],
        "Manifest": data["manifest"],
    }


def test_manifest_v1_set_raw_body(coordinator: RunningCoordinator, root_pem: Path, tmp_path: Path) -> None:
    url = coordinator.client_url
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(activation_manifest_bytes())
    status, headers, body = curl(
        "--cacert", str(root_pem), "--data-binary", f"@{manifest}", f"{url}/manifest"
    )
    assert status == 200, body
    assert headers["content-type"].startswith("application/json")
    assert jsend(body) == {"status": "success", "data": None}  # no RecoveryKeys: data is null in v1

    status, _, body = curl("--cacert", str(root_pem), f"{url}/api/v2/manifest")
    data = jsend(body)["data"]
    assert base64.b64decode(data["manifest"]) == manifest.read_bytes()
    signature = base64.b64decode(data["manifestSignatureRootECDSA"])
    public = x509.load_pem_x509_certificate(root_pem.read_bytes()).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, manifest.read_bytes(), ec.ECDSA(hashes.SHA256()))  # raises if wrong


def test_manifest_get_before_set(coordinator: RunningCoordinator, root_pem: Path) -> None:
    url = coordinator.client_url
    status, _, body = curl("--cacert", str(root_pem), f"{url}/api/v2/manifest")
    assert status == 404  # deviation: MarbleRun answers 500 (compat notes)
    doc = jsend(body)
    assert doc["status"] == "fail"
    assert "manifest set" in doc["message"]
    # v1 answers 200 with empty fields, as MarbleRun does.
    status, _, body = curl("--cacert", str(root_pem), f"{url}/manifest")
    assert status == 200
    assert jsend(body)["data"] == {
        "ManifestSignatureRootECDSA": None,
        "ManifestSignature": "",
        "Manifest": None,
    }


def test_manifest_set_twice_is_refused_with_the_state_message(
    coordinator: RunningCoordinator, root_pem: Path, tmp_path: Path
) -> None:
    url = coordinator.client_url
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(activation_manifest_bytes())
    coordinator.set_manifest()
    # v1: every set-manifest failure is 400 fail
    status, _, body = curl("--cacert", str(root_pem), "--data-binary", f"@{manifest}", f"{url}/manifest")
    assert status == 400
    doc = jsend(body)
    assert (doc["status"], doc["message"]) == ("fail", "server is not in expected state")
    # v2: 409 fail (MarbleRun: 500 error), with the same message
    body_file = tmp_path / "set.json"
    body_file.write_text(json.dumps({"manifest": base64.b64encode(manifest.read_bytes()).decode()}))
    status, _, body = curl(
        "--cacert", str(root_pem), "--data-binary", f"@{body_file}", f"{url}/api/v2/manifest"
    )
    assert status == 409
    doc = jsend(body)
    assert (doc["status"], doc["message"]) == ("fail", "server is not in expected state")


def test_manifest_v1_invalid_manifest_is_400_with_problems(
    coordinator: RunningCoordinator, root_pem: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"Marbles": {"m": {"Package": "missing"}}}))
    status, _, body = curl(
        "--cacert", str(root_pem), "--data-binary", f"@{bad}", f"{coordinator.client_url}/manifest"
    )
    assert status == 400
    doc = jsend(body)
    assert doc["status"] == "fail"
    paths = [p["path"] for p in doc["data"]["problems"]]
    assert any("Marbles.m" in p for p in paths), doc
    # v2 reports it as 400 fail too (MarbleRun: 500 error)
    body_file = tmp_path / "set.json"
    body_file.write_text(json.dumps({"manifest": base64.b64encode(bad.read_bytes()).decode()}))
    status, _, body = curl(
        "--cacert",
        str(root_pem),
        "--data-binary",
        f"@{body_file}",
        f"{coordinator.client_url}/api/v2/manifest",
    )
    assert status == 400
    assert jsend(body)["status"] == "fail"
    assert coordinator.coord.status()[0] == 2  # nothing was set


def test_v1_recover_is_410(coordinator: RunningCoordinator, root_pem: Path) -> None:
    status, _, body = curl("--cacert", str(root_pem), "-X", "POST", f"{coordinator.client_url}/recover")
    assert status == 410
    doc = jsend(body)
    assert doc["status"] == "fail"
    assert "Use the /api/v2/recover endpoint instead." in doc["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v2/does-not-exist"),
        ("GET", "/"),
        ("GET", "/api/v3/status"),
        ("POST", "/api/v2/status"),
        ("DELETE", "/api/v2/manifest"),
        ("PUT", "/manifest"),
        ("POST", "/quote"),
        ("GET", "/recover"),
        ("PATCH", "/api/v2/quote"),
    ],
)
def test_unknown_path_or_method_is_405_with_empty_error(
    coordinator: RunningCoordinator, root_pem: Path, method: str, path: str
) -> None:
    status, headers, body = curl("--cacert", str(root_pem), "-X", method, f"{coordinator.client_url}{path}")
    assert status == 405
    # JSend error as Go's http.Error writes it: text/plain, nosniff, no message
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff"
    assert jsend(body) == {"status": "error", "data": None}


def test_go_json_escaping_in_envelopes(
    coordinator: RunningCoordinator, root_pem: Path, tmp_path: Path
) -> None:
    """Bodies escape <, > and & like Go's encoder (the status warning and messages pass through it)."""
    bad = tmp_path / "bad.json"
    bad.write_text('{"Marbles": {"<&>": {"Package": "<&>"}}}')
    _, _, body = curl(
        "--cacert", str(root_pem), "--data-binary", f"@{bad}", f"{coordinator.client_url}/manifest"
    )
    assert b"<" not in body and b">" not in body and b"&" not in body
    assert b"\\u003c\\u0026\\u003e" in body
